"""Features Replay, DDG and DNI against backprop: exact equalities where the algorithms promise them."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import gradkit
from gradkit.errors import ConfigError
from gradkit.methods import build
from gradkit.optim import OptimizerConfig
from gradkit.pipeline import PipelineError

DECOUPLED = ("fr", "ddg", "dni")


def small_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU()),
        nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU()),
        nn.Sequential(nn.Linear(32, 24), nn.ReLU()),
        nn.Sequential(nn.Linear(24, 4)),
    )


def batches(n: int = 6, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 1, 4, 4, generator=g), torch.randint(0, 4, (size,), generator=g)) for _ in range(n)]


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("name", DECOUPLED)
@pytest.mark.parametrize("opt", [OptimizerConfig(name="sgd", lr=0.1, weight_decay=5e-4),
                                 OptimizerConfig(name="adam", lr=0.01)], ids=["sgd", "adam"])
def test_one_stage_is_backprop_bit_for_bit(name: str, opt: OptimizerConfig) -> None:
    ref_model, model = small_model(), small_model()
    reference = build("bp", [ref_model], optimizer=opt.factory())
    method = build(name, [model], optimizer=opt.factory())
    for x, y in batches():
        assert method.step(x, y) == reference.step(x, y)
    assert same_weights(model, ref_model)


def _applied_gradients(name: str, k: int, data: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """The gradient each stage applies for each batch, with frozen weights (lr 0)."""
    model = small_model()
    method = build(name, gradkit.split(model, k, balance="count"),
                   optimizer=OptimizerConfig(lr=0.0, momentum=0.9, weight_decay=5e-4).factory())
    applied: dict[tuple[int, int], list[torch.Tensor]] = {}
    method.update_observers.append(
        lambda stage, batch, params: applied.__setitem__((stage, batch), [p.grad.clone() for p in params])
    )
    for x, y in data:
        method.step(x, y)
    method.flush()
    return applied


@pytest.mark.parametrize("name", ["fr", "ddg"])
def test_frozen_weights_apply_the_true_gradient_of_each_batch(name: str) -> None:
    """With lr 0 the weights never move, so the stale δ is the true δ: every stage must apply exactly
    the backprop gradient of the batch it is training on."""
    data = batches(5)
    k = 3
    applied = _applied_gradients(name, k, data)
    model = small_model()
    stages = gradkit.split(model, k, balance="count")
    assert len(applied) == k * len(data)  # after flush, every stage trained on every batch
    for b, (x, y) in enumerate(data):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for s, stage in enumerate(stages):
            expected = [p.grad for p in stage.parameters()]
            for got, want in zip(applied[(s, b)], expected, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_dni_warmup_uses_true_gradients() -> None:
    """During the warm-up DNI waits for the true δ, so with SGD it follows backprop exactly."""
    ref_model, model = small_model(), small_model()
    opt = OptimizerConfig(lr=0.1)
    reference = build("bp", gradkit.split(ref_model, 3, balance="count"), optimizer=opt.factory())
    method = build("dni", gradkit.split(model, 3, balance="count"), optimizer=opt.factory(), warmup_steps=100)
    for x, y in batches():
        torch.testing.assert_close(method.step(x, y), reference.step(x, y), rtol=1e-6, atol=0)
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_dni_synthesizer_learns_the_true_gradient() -> None:
    """Fitting on the true δ must make the (zero-initialised) synthetic δ point along it."""
    model = small_model()
    method = build("dni", gradkit.split(model, 2, balance="count"), optimizer=OptimizerConfig(lr=0.02).factory(),
                   warmup_steps=10_000, synthesizer_lr=0.05, conditioned=True)
    x, y = batches(1, size=64)[0]
    for _ in range(300):
        method.step(x, y)
    method.flush()
    synthesizer = method.pipeline_stages[0].synthesizer  # type: ignore[attr-defined]
    out = method.stages[0](x)
    (true_delta,) = torch.autograd.grad(nn.functional.cross_entropy(method.stages[1](out), y), out)
    with torch.no_grad():
        predicted = synthesizer(out.detach(), y) / x.shape[0]
    cosine = nn.functional.cosine_similarity(predicted.flatten(), true_delta.flatten(), dim=0).item()
    assert cosine > 0.6


def test_dni_min_cosine_keeps_untrusted_stages_still_and_still_sends_delta_down() -> None:
    """min_cosine=1 never trusts a synthesizer: the stages below the last keep their weights (no
    weight-decay or momentum drift either), yet every synthesizer still fits on the δ sent down."""
    model = small_model()
    before = copy.deepcopy(model)
    method = build("dni", gradkit.split(model, 3, balance="count"), min_cosine=1.0,
                   optimizer=OptimizerConfig(name="adam", lr=0.01, weight_decay=1e-3).factory())
    for x, y in batches(8):
        method.step(x, y)
    lower = method.pipeline_stages[:-1]
    kept = [torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters(), strict=True)]
    n_lower = sum(len(list(s.module.parameters())) for s in lower)
    assert all(kept[:n_lower]) and not any(kept[n_lower:])  # the last stage trains as usual
    for stage in lower:
        assert stage.synthetic_updates == {"applied": 0, "skipped": 8}
        last_layer = list(stage.synthesizer.parameters())[-2:]
        assert any(p.abs().sum() > 0 for p in last_layer)  # the zero-initialised last layer has learned
    # Resume: the trust and the counts travel with the in-flight state.
    again = build("dni", gradkit.split(copy.deepcopy(model), 3, balance="count"), min_cosine=1.0)
    again.load_state_dict(method.state_dict())
    assert [float(s.agreement) for s in again.pipeline_stages[:-1]] == [float(s.agreement) for s in lower]
    assert [s.synthetic_updates for s in again.pipeline_stages[:-1]] == [s.synthetic_updates for s in lower]


def test_dni_min_cosine_applies_a_synthesizer_once_it_agrees_with_the_true_delta() -> None:
    # During the warm-up the true δ is used and the synthesizer fits; a conditioned one learns a fixed
    # batch's δ (cosine > 0.6, as tested above), so afterwards its δ is trusted and applied.
    model = small_model()
    method = build("dni", gradkit.split(model, 2, balance="count"), optimizer=OptimizerConfig(lr=0.02).factory(),
                   warmup_steps=300, synthesizer_lr=0.05, conditioned=True, min_cosine=0.5)
    x, y = batches(1, size=64)[0]
    for _ in range(305):
        method.step(x, y)
    first = method.pipeline_stages[0]
    assert first.agreement > 0.5
    assert first.synthetic_updates["applied"] >= 4 and first.synthetic_updates["skipped"] == 0


def test_dni_default_min_cosine_guards_sequence_boundaries_only() -> None:
    """By default a sequence boundary (a language model's (N, T, C)) gates on agreement 0.1 and any
    other keeps the paper's rule (-1): the default runs equal the runs with those values given."""
    from gradkit.methods.synthetic_gradients import SEQUENCE_MIN_COSINE
    from gradkit.models import build_model

    def gpt_run(**options: object) -> tuple[nn.Module, list]:
        torch.manual_seed(0)
        model = build_model("gpt", (8,), 12, layers=2, width=16, heads=2)
        method = build("dni", gradkit.split(model, 2, balance="count"),
                       optimizer=OptimizerConfig(name="adam", lr=1e-2).factory(), **options)
        g = torch.Generator().manual_seed(1)
        for _ in range(6):
            x = torch.randint(0, 12, (8, 8), generator=g)
            method.step(x, (x + 1) % 12)
        return model, method.synthetic_update_counts()

    default_model, default_counts = gpt_run()
    guarded_model, guarded_counts = gpt_run(min_cosine=SEQUENCE_MIN_COSINE)
    paper_model, _ = gpt_run(min_cosine=-1.0)
    assert same_weights(default_model, guarded_model) and default_counts == guarded_counts
    assert default_counts[0]["min_cosine"] == 0.1 and default_counts[0]["skipped"] >= 2
    assert not same_weights(default_model, paper_model)

    def mlp_run(**options: object) -> nn.Module:
        model = small_model()
        method = build("dni", gradkit.split(model, 2, balance="count"), **options)
        for x, y in batches(4):
            method.step(x, y)
        assert [c["min_cosine"] for c in method.synthetic_update_counts()] == [-1.0]
        return model

    assert same_weights(mlp_run(), mlp_run(min_cosine=-1.0))


def test_dni_min_cosine_out_of_range_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="min_cosine"):
        build("dni", gradkit.split(small_model(), 2, balance="count"), min_cosine=1.5)


@pytest.mark.parametrize("name", DECOUPLED)
def test_adam_and_a_custom_loss_train(name: str) -> None:
    def smooth_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, y, label_smoothing=0.1)

    model = small_model()
    method = build(name, gradkit.split(model, 3, balance="count"), loss_fn=smooth_loss,
                   optimizer=OptimizerConfig(name="adam", lr=0.01).factory())
    data = batches(1, size=32) * 60
    losses = [method.step(x, y) for x, y in data]
    # DNI starts from zero synthetic gradients, so its lower stages learn later.
    assert losses[-1] < (0.85 if name == "dni" else 0.6) * losses[0]


@pytest.mark.parametrize("name", DECOUPLED)
def test_state_dict_round_trip_mid_pipeline_continues_exactly(name: str) -> None:
    data = batches(9)
    opt = OptimizerConfig(lr=0.05)
    a = build(name, gradkit.split(small_model(), 3, balance="count"), optimizer=opt.factory())
    losses_a = [a.step(x, y) for x, y in data]
    a.flush()

    b = build(name, gradkit.split(small_model(), 3, balance="count"), optimizer=opt.factory())
    losses_b = [b.step(x, y) for x, y in data[:4]]
    assert b.buffer_bytes() > 0  # something really is in flight
    buf = io.BytesIO()
    torch.save(b.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    c = build(name, gradkit.split(small_model(seed=5), 3, balance="count"), optimizer=opt.factory())
    c.load_state_dict(state)
    losses_b += [c.step(x, y) for x, y in data[4:]]
    c.flush()
    assert losses_b == losses_a
    for p, q in zip(a.parameters(), c.parameters(), strict=True):
        assert torch.equal(p, q)


def test_fr_bn_policy_controls_running_statistics_updates() -> None:
    data = batches(4)
    counts = {}
    for policy in ("play", "reference"):
        model = small_model()
        method = build("fr", gradkit.split(model, 2, balance="count"), bn_policy=policy)
        for x, y in data:
            method.step(x, y)
        bn = model[1][1]
        counts[policy] = int(bn.num_batches_tracked)
    # stage 0 holds the BatchNorm; it plays 4 batches and replays 3 of them.
    assert counts == {"play": 4, "reference": 7}


def test_fr_double_first_lr_is_opt_in() -> None:
    method = build("fr", gradkit.split(small_model(), 2, balance="count"), optimizer=OptimizerConfig(lr=0.1).factory(),
                   double_first_lr=True)
    assert [opt.param_groups[0]["lr"] for opt in method.optimizers] == [0.2, 0.1]
    method.set_lr_factor(0.5)  # a schedule's factor
    assert [opt.param_groups[0]["lr"] for opt in method.optimizers] == [0.1, 0.05]
    plain = build("fr", gradkit.split(small_model(), 2, balance="count"), optimizer=OptimizerConfig(lr=0.1).factory())
    assert [opt.param_groups[0]["lr"] for opt in plain.optimizers] == [0.1, 0.1]


def test_a_resume_with_another_lr_keeps_the_stage_scales() -> None:
    # --resume may lower --lr after a divergence: that replaces the base rate of every group, and the
    # first stage's doubling (double_first_lr) and the stale stages' scales (stale_lr) still apply.
    from gradkit import TrainConfig
    from gradkit.backend import apply_resume_changes

    options = {"double_first_lr": True, "stale_lr": "inverse"}
    method = build("fr", gradkit.split(small_model(), 3, balance="count"), optimizer=OptimizerConfig(lr=0.1).factory(),
                   **options)
    saved = TrainConfig(method="fr", stages=3, lr=0.1, method_options=options).to_dict()
    changes = apply_resume_changes(TrainConfig(method="fr", stages=3, lr=0.01, method_options=options), saved, method)
    assert changes["lr"] == [0.1, 0.01]
    method.set_lr_factor(1.0)
    lrs = [opt.param_groups[0]["lr"] for opt in method.optimizers[:3]]
    assert lrs == pytest.approx([0.01 * 2 / 3, 0.01 / 2, 0.01])  # stage k: base x (2 if k == 0) / (1 + staleness)


@pytest.mark.parametrize("name", ["fr", "ddg"])
def test_stale_momentum_sets_the_momentum_of_the_stale_stages_only(name: str) -> None:
    adam = build(name, gradkit.split(small_model(), 3, balance="count"), stale_momentum=0.5,
                 optimizer=OptimizerConfig(name="adam", lr=0.01).factory())
    assert [opt.param_groups[0]["betas"] for opt in adam.optimizers[:3]] == [(0.5, 0.999), (0.5, 0.999), (0.9, 0.999)]
    sgd = build(name, gradkit.split(small_model(), 3, balance="count"), stale_momentum=0.0,
                optimizer=OptimizerConfig(lr=0.1).factory())
    groups = [opt.param_groups[0] for opt in sgd.optimizers[:3]]
    assert [(g["momentum"], g["nesterov"]) for g in groups] == [(0.0, False), (0.0, False), (0.9, True)]
    losses = [sgd.step(x, y) for x, y in batches()]  # torch takes the settings
    assert all(math.isfinite(v) for v in losses)
    # A --resume that changes --momentum leaves the stale stages at theirs.
    from gradkit import TrainConfig
    from gradkit.backend import apply_resume_changes

    options = {"stale_momentum": 0.0}
    saved = TrainConfig(method=name, stages=3, method_options=options).to_dict()
    apply_resume_changes(TrainConfig(method=name, stages=3, momentum=0.5, method_options=options), saved, sgd)
    assert [g["momentum"] for g in groups] == [0.0, 0.0, 0.5]
    with pytest.raises(ConfigError, match="stale_momentum must be a number in"):
        build(name, gradkit.split(small_model(), 2, balance="count"), stale_momentum=1.0)


def test_bad_options_are_config_errors() -> None:
    stages = gradkit.split(small_model(), 2, balance="count")
    with pytest.raises(ConfigError, match="bn_policy"):
        build("fr", stages, bn_policy="sometimes")
    with pytest.raises(ConfigError, match="true_gradient_mix"):
        build("dni", stages, true_gradient_mix=2.0)
    with pytest.raises(ConfigError, match="does not take option 'bn_policy'"):
        build("ddg", stages, bn_policy="play")


def test_a_message_for_the_wrong_batch_is_an_error() -> None:
    method = build("fr", gradkit.split(small_model(), 3, balance="count"))
    data = batches(3)
    for x, y in data[:2]:
        method.step(x, y)
    # Swap the tag of the δ waiting for stage 1: the replay must refuse it.
    channel = ("delta", 2, 1)
    message = method.executor.channels[channel][0]
    method.executor.channels[channel][0] = type(message)(message.batch + 1, message.tensor)
    with pytest.raises(PipelineError, match="expected the delta of batch 1 from stage 2 but received batch 2"):
        method.step(*data[2])


def test_epoch_boundary_keeps_batches_in_flight_and_flush_drains() -> None:
    method = build("fr", gradkit.split(small_model(), 4, balance="count"))
    for x, y in batches(5):
        method.step(x, y)
    fifo_lengths = [len(w.fifo) for w in method.pipeline_stages[:-1]]  # type: ignore[attr-defined]
    assert fifo_lengths == [3, 2, 1]  # stage k holds its last K-1-k inputs between steps
    method.flush()
    assert method.buffer_bytes() == 0 and method.executor.empty()
    # Training goes on after a flush: the pipeline warms up again.
    method.step(*batches(1)[0])
    assert [len(w.fifo) for w in method.pipeline_stages[:-1]] == [1, 1, 1]  # type: ignore[attr-defined]


def test_predict_uses_current_weights_and_leaves_the_pipeline_alone() -> None:
    model = small_model()
    method = build("ddg", gradkit.split(model, 3, balance="count"))
    for x, y in batches(4):
        method.step(x, y)
    stashed = [[e.batch for e in w.stash] for w in method.pipeline_stages[:-1]]  # type: ignore[attr-defined]
    messages = {k: [m.batch for m in q] for k, q in method.executor.channels.items()}
    state = copy.deepcopy(method.state_dict())
    x = batches(1)[0][0]
    reference = copy.deepcopy(model).eval()
    method.eval()
    torch.testing.assert_close(method.predict(x), reference(x), rtol=0, atol=0)
    method.train()
    assert [[e.batch for e in w.stash] for w in method.pipeline_stages[:-1]] == stashed  # type: ignore[attr-defined]
    assert {k: [m.batch for m in q] for k, q in method.executor.channels.items()} == messages
    for name, value in method.state_dict()["stages"][1].items():  # BatchNorm statistics included
        assert torch.equal(value, state["stages"][1][name]), name
    assert stashed == [[2, 3], [3]]  # stage k holds its last K-1-k graphs between steps
    # ...and the pipeline carries on where it was: the next step trains the oldest stashed batches.
    method.step(*batches(1)[0])
    assert [[e.batch for e in w.stash] for w in method.pipeline_stages[:-1]] == [[3, 4], [4]]  # type: ignore[attr-defined]


def test_synchronous_pipeline_equals_backprop() -> None:
    from gradkit.methods.synchronous import SynchronousPipeline

    ref_model, model = small_model(), small_model()
    opt = OptimizerConfig(lr=0.1)
    reference = build("bp", [ref_model], optimizer=opt.factory())
    method = SynchronousPipeline(gradkit.split(model, 3, balance="count"), optimizer=opt.factory(),
                                 record_timeline=True)
    for x, y in batches():
        torch.testing.assert_close(method.step(x, y), reference.step(x, y), rtol=1e-6, atol=0)
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # forward up, loss, backward down, then each stage updates: every stage finishes batch t in step t
    first_step = [(e.stage, e.op) for e in method.executor.timeline if e.step == 0]
    assert first_step == [(0, "forward"), (1, "forward"), (2, "loss"), (2, "update"),
                          (1, "backward"), (1, "update"), (0, "backward"), (0, "update")]


@pytest.mark.parametrize("name", ["fr", "ddg"])
@pytest.mark.parametrize(("kind", "scales"), [("inverse", [1 / 3, 1 / 2, 1.0]), ("sqrt", [3**-0.5, 2**-0.5, 1.0]),
                                               ("none", [1.0, 1.0, 1.0])])
def test_stale_lr_scales_each_stage_by_the_age_of_its_gradients(name: str, kind: str, scales: list[float]) -> None:
    method = build(name, gradkit.split(small_model(), 3, balance="count"),
                   optimizer=OptimizerConfig(lr=0.1).factory(), stale_lr=kind)
    method.set_lr_factor(0.5)  # the schedule multiplies on top
    assert [opt.param_groups[0]["lr"] for opt in method.optimizers] == pytest.approx([0.05 * s for s in scales])


@pytest.mark.parametrize("name", ["fr", "ddg"])
def test_clip_grad_norm_bounds_each_stage_update(name: str) -> None:
    norms: dict[int, list[float]] = {0: [], 1: []}
    method = build(name, gradkit.split(small_model(), 2, balance="count"), clip_grad_norm=1e-3,
                   optimizer=OptimizerConfig(lr=0.1).factory())
    method.update_observers.append(lambda stage, batch, params: norms[stage].append(
        float(torch.cat([p.grad.flatten() for p in params]).norm())))
    for x, y in batches(4):
        method.step(x, y)
    assert norms[0] and norms[1]
    assert max(norms[0] + norms[1]) == pytest.approx(1e-3, rel=1e-4)  # raw norms here are far above 1e-3


def test_bad_stale_lr_and_clip_are_config_errors() -> None:
    stages = gradkit.split(small_model(), 2, balance="count")
    with pytest.raises(ConfigError, match="unknown stale_lr 'half'"):
        build("fr", stages, stale_lr="half")
    with pytest.raises(ConfigError, match="clip_grad_norm must be a number >= 0"):
        build("ddg", stages, clip_grad_norm=-1.0)


def test_dni_epoch_records_show_its_synthetic_updates(tmp_path) -> None:  # noqa: ANN001
    """metrics.jsonl says how many synthetic updates each stage applied or skipped, so a lower stage
    that the default guard keeps still (a language model's) is visible from the command line."""
    import json

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over a lazy dog " * 40, encoding="utf-8")
    gradkit.train(gradkit.TrainConfig(
        method="dni", stages=2, model="gpt", model_options={"layers": 2, "width": 16, "heads": 2},
        data="text", data_options={"path": str(text), "context": 8}, limit_train=64, limit_test=16,
        batch_size=16, epochs=2, optimizer="adam", lr=1e-2, threads=1, progress=False, out=str(tmp_path / "run")))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for epoch, record in enumerate(records, start=1):
        lower, last = record["synthetic_updates"]
        assert last is None  # the last stage has the true δ, no synthesizer
        assert lower["applied"] + lower["skipped"] == 4 * epoch  # 64 windows in batches of 16, counted so far
        assert lower["min_cosine"] == 0.1 and -1.0 <= lower["agreement"] <= 1.0
