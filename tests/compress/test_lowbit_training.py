"""Low bits that stay right while training (issue 14 item 4): attention kept at 8 bits under int2, the
loss kept exact inside the model's forward, gradient checks at trained weights."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradkit
from gradkit.cli import main
from gradkit.compress import Activations, GradientCheck, check_gradients, pretrain, track_gradients
from gradkit.errors import ConfigError
from gradkit.losses import cross_entropy
from gradkit.models import build_model

VOCAB, T = 24, 32


def _gpt(layers: int = 1, width: int = 32) -> nn.Sequential:
    torch.manual_seed(0)
    return build_model("gpt", (T,), VOCAB, layers=layers, width=width, heads=2)


def _tokens(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, T), generator=g), torch.randint(0, VOCAB, (n, T), generator=g)


def _records(model: nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor, loss_fn=cross_entropy,
             **options: object) -> list:
    act = Activations(model, mode, **options)
    try:
        with act, act.recording() as records:
            loss = loss_fn(model(x), y)
        loss.backward()
    finally:
        act.close()
    return records


# -- attention -----------------------------------------------------------------------------------------
def test_int2_keeps_attention_at_8_bits_by_default() -> None:
    x, y = _tokens()
    records = _records(_gpt(), "int2", x, y)
    attention = [r for r in records if r.rule == "attention"]
    # q, k, v and the output saved by scaled_dot_product_attention (in block1.attn), and the output's
    # copy saved as the output projection's input (block1.attn.proj).
    assert sum(r.module == "block1.attn" for r in attention) == 4
    assert [r.module for r in attention if r.module != "block1.attn"] == ["block1.attn.proj"]
    assert {r.kind for r in attention} == {"int8"}
    # Everything else still at 2 bits: the MLP and the attention's input projection.
    mlp = [r for r in records if r.module.startswith("block1.mlp") and r.kind.startswith("int")
           and r.dtype.is_floating_point]
    assert mlp and {r.kind for r in mlp} == {"int2"}
    assert all(r.kind == "int2" for r in records if r.module == "block1.attn.qkv" and r.dtype.is_floating_point
               and r.kind.startswith("int"))


def test_attention_bits_overrides_the_default() -> None:
    x, y = _tokens()
    model = _gpt()
    off = _records(model, "int2", x, y, attention_bits="off")
    assert not any(r.rule for r in off)
    assert {r.kind for r in off if r.module == "block1.attn" and r.kind.startswith("int")} == {"int2"}
    exact = [r for r in _records(model, "int2", x, y, attention_bits="exact") if r.rule == "attention"]
    # Kept tensors are counted per storage: q, k, v are views of one, the output and its copy of another.
    assert len(exact) == 2 and all(r.kind == "exact" and r.stored_bytes == r.exact_bytes for r in exact)
    # int4 has no rule by default; asked for, it widens attention to 8 bits there too.
    assert not any(r.rule for r in _records(model, "int4", x, y))
    assert {r.kind for r in _records(model, "int4", x, y, attention_bits=8) if r.rule} == {"int8"}
    # A floor, not a cap: 2 under int4 changes nothing.
    assert not any(r.rule for r in _records(model, "int4", x, y, attention_bits=2))
    stored = {ab: sum(r.stored_bytes for r in _records(model, "int2", x, y, attention_bits=ab))
              for ab in ("off", "auto")}
    assert stored["off"] < stored["auto"]


def test_attention_bits_is_validated_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="--attention-bits 3 is not one of auto, off, exact"):
        Activations(_gpt(), "int2", attention_bits=3)
    with pytest.raises(ConfigError, match="--attention-bits 'max'"):
        gradkit.TrainConfig(activations="int2", attention_bits="max")
    assert gradkit.TrainConfig(activations="int2", attention_bits=8).attention_bits == "8"  # stored as text
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", "unused", "--activations", "int2", "--attention-bits", "3"])
    assert exc.value.code == 2
    assert "--attention-bits" in capsys.readouterr().err


class _HandWritten(nn.Module):
    """Attention without scaled_dot_product_attention: softmax(q k^T) v, as many user models write it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.qkv = nn.Linear(32, 96)
        self.head = nn.Linear(32, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.embed(ids)).chunk(3, dim=-1)
        weights = (q @ k.transpose(1, 2) / 32 ** 0.5).softmax(dim=-1)
        return self.head(weights @ v)


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.block = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        self.mha = nn.MultiheadAttention(32, 2, batch_first=True)  # need_weights: the softmax path
        self.head = nn.Linear(32, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.block(self.embed(ids))
        return self.head(self.mha(h, h, h)[0])


@pytest.mark.parametrize("make,where", [(_HandWritten, ""), (_Encoder, "block.self_attn"), (_Encoder, "mha")])
def test_attention_is_found_in_user_models(make: type[nn.Module], where: str) -> None:
    torch.manual_seed(0)
    x, y = _tokens()
    records = _records(make(), "int2", x, y)
    widened = [r for r in records if r.rule == "attention"]
    assert widened and {r.kind for r in widened} == {"int8"}
    if where:  # everything nn.MultiheadAttention saves with >= 8 bits (tiny and int tensors aside)
        inside = [r for r in records if r.module.startswith(where) and r.kind.startswith("int")
                  and r.dtype.is_floating_point]
        assert inside and all(r.kind == "int8" for r in inside)
    else:  # the attention weights (T x T per sequence), saved by softmax and by the product with v
        assert any(r.shape == (8, T, T) for r in widened)


def test_attention_rule_keeps_sharp_attention_right() -> None:
    """Training sharpens attention (larger q.k); here q and k are scaled x10, as training would grow them.
    At 2 bits the recomputed attention weights are then wrong and the gradients with them."""
    model, batch = _gpt(layers=2, width=64), _tokens()
    sharp = {k: v.clone() for k, v in model.state_dict().items()}
    for name, value in sharp.items():
        if name.endswith("attn.qkv.weight"):
            value[:128] *= 10  # the q and k rows
    median = {}
    for at, weights in (("init", None), ("sharp", sharp)):
        for ab in ("off", "auto"):
            layers = check_gradients(model, batch, "int2", weights=weights, attention_bits=ab)
            median[at, ab] = statistics.median(r.cosine for r in layers)
    assert median["init", "off"] > 0.8 and abs(median["init", "off"] - median["init", "auto"]) < 0.02  # diffuse
    assert median["sharp", "off"] < 0.3  # measured 0.04
    assert median["sharp", "auto"] > 0.8  # measured 0.85


# -- the loss ------------------------------------------------------------------------------------------
class _WithLoss(nn.Module):
    """A model whose forward returns the loss (as many language-model codebases do)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.logits: torch.Tensor | None = None

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.logits = self.model(ids)
        self.logits.retain_grad()
        return F.cross_entropy(self.logits.flatten(0, 1), targets.flatten())


def _logit_grads(mode: str, inside: bool) -> tuple[torch.Tensor, list[torch.Tensor], list]:
    wrapped = _WithLoss(_gpt())
    x, y = _tokens()
    act = Activations(wrapped, mode)
    torch.manual_seed(1)
    with act, act.recording() as records:
        if inside:
            loss = wrapped(x, y)
        else:
            wrapped.logits = logits = wrapped.model(x)
            logits.retain_grad()
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    loss.backward()
    act.close()
    assert wrapped.logits is not None and wrapped.logits.grad is not None
    return wrapped.logits.grad, [p.grad for p in wrapped.parameters()], records


def test_loss_inside_forward_is_kept_exact() -> None:
    exact, _, _ = _logit_grads("exact", inside=True)
    inside, inside_params, records = _logit_grads("int2", inside=True)
    outside, outside_params, _ = _logit_grads("int2", inside=False)
    # The loss's saved tensors (the log-softmax, saved by log_softmax and nll_loss) are stored exactly.
    loss = [r for r in records if r.kind == "loss"]
    assert loss and all(r.stored_bytes == r.exact_bytes and r.shape == (8 * T, VOCAB) for r in loss)
    # So the gradient where backprop starts is the exact one, and the rest equals the loss-outside run.
    torch.testing.assert_close(inside, exact, rtol=0, atol=0)
    torch.testing.assert_close(inside, outside, rtol=0, atol=0)
    for a, b in zip(inside_params, outside_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


class _HeadWithLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.fc(h), y)


class _LossInside(nn.Module):
    """Two children (as a pipeline runs them, one at a time); the second computes the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 64), nn.ReLU())
        self.head = _HeadWithLoss()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x), y)


def _rules_on(act: Activations) -> bool:
    assert act.compressor is not None
    return act.compressor._regions is not None


def test_rules_are_dropped_for_models_without_attention_or_inner_loss() -> None:
    """The rules' function mode costs a Python call per torch call: a ResNet sheds it after one step,
    while a model that calls attention, or computes its loss inside, keeps it."""
    resnet = build_model("resnet20", (3, 32, 32), 10)
    act = Activations(resnet, "int4")
    with act:
        loss = F.cross_entropy(resnet(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2]))
    loss.backward()
    assert not _rules_on(act)
    lm = build_model("gpt", (T,), VOCAB)
    act = Activations(lm, "int4")
    for _ in range(2):
        with act:
            loss = cross_entropy(lm(torch.randint(0, VOCAB, (2, T))), torch.randint(0, VOCAB, (2, T)))
        loss.backward()
    assert _rules_on(act)
    # Run child by child, as a pipeline does: the rules stay until the child with the loss has run,
    # and then for good, so the loss's saved tensors stay exact in later steps.
    model = _LossInside()
    act = Activations(model, "int2")
    x, y = torch.randn(128, 32), torch.randint(0, 10, (128,))  # a log-softmax above min_numel
    with act:
        model.body(x)
    assert _rules_on(act)
    for _ in range(2):
        with act, act.recording() as records:
            loss = model.head(model.body(x), y)
        loss.backward()
        assert _rules_on(act)
    assert any(r.kind == "loss" for r in records)


# -- checks at trained weights -------------------------------------------------------------------------
def test_check_gradients_uses_trained_weights(tmp_path: Path) -> None:
    model, batch = _gpt(), _tokens()
    train = [_tokens(seed=s) for s in range(1, 6)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    at_init = check_gradients(model, batch, "int2")
    after_steps = check_gradients(model, batch, "int2", steps=5, batches=iter(train))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched
    trained = _gpt()
    assert pretrain(trained, iter(train), 5) == 5
    by_hand = check_gradients(trained, batch, "int2")
    assert [r.cosine for r in after_steps] == [r.cosine for r in by_hand]
    assert [r.cosine for r in after_steps] != [r.cosine for r in at_init]
    # The same weights from a finished run's folder (its model.pt) or a state dict.
    (tmp_path / "run").mkdir()
    torch.save(trained.state_dict(), tmp_path / "run" / "model.pt")
    for weights in (tmp_path / "run", str(tmp_path / "run" / "model.pt"), trained.state_dict()):
        assert [r.cosine for r in check_gradients(model, batch, "int2", weights=weights)] == \
            [r.cosine for r in by_hand]
    with pytest.raises(ConfigError, match="has no model.pt"):
        check_gradients(model, batch, "int2", weights=tmp_path)
    with pytest.raises(ConfigError, match="trains on batches="):
        check_gradients(model, batch, "int2", steps=3)


def test_track_gradients_checks_along_training() -> None:
    model, batch = _gpt(), _tokens()
    train = [batch] + [_tokens(seed=s) for s in range(1, 6)]
    checks = track_gradients(model, iter(train), "int2", steps=5, every=2)
    assert [c.step for c in checks] == [0, 2, 4, 5]
    assert checks[0] == GradientCheck.of(0, check_gradients(model, batch, "int2"))  # probe: the first batch
    trained = _gpt()
    pretrain(trained, iter(train[1:]), 5)  # one optimizer across the checks: equal to 5 steps in one go
    assert checks[-1].layers == check_gradients(trained, batch, "int2")
    assert checks[-1].to_dict()["step"] == 5 and checks[-1].min <= checks[-1].median
    # Trained under int2 itself: other weights, so another check at step 2.
    lowbit = track_gradients(model, iter(train), "int2", steps=2, every=2, train_mode="int2")
    assert lowbit[0] == checks[0] and lowbit[1].step == 2 and lowbit[1].layers != checks[1].layers


def test_diagnose_checks_activations_after_training_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    common = ["diagnose", "--activations", "int2", "--model", "gpt", "--data", "text", "--data-option",
              f"path={text}", "--data-option", "context=16", "--model-option", "layers=1", "--model-option",
              "width=32", "--batch-size", "8", "--optimizer", "adam", "--json", "--no-progress"]
    results = {}
    for steps in ("0", "4"):
        assert main([*common, "--train-steps", steps]) == 0
        results[steps] = json.loads(capsys.readouterr().out)
    assert results["4"]["check"] == "activations" and results["4"]["train_steps"] == 4
    assert len(results["4"]["layers"]) == len(results["0"]["layers"]) == 10
    assert results["4"]["layers"] != results["0"]["layers"]
    assert main([*common, "--method", "ulr"]) == 2
    assert "leave out --method ulr" in capsys.readouterr().err
