"""Issue 14, done-when 4: the errors a user met bringing a language model (its table's "errors" row) are
one-line ``ConfigError``s that say what to change (exit 2 from the CLI), or, where the combination makes
sense, work: ``ulr`` takes per-token losses, cDNI conditions on per-token labels.

The user's models are ``lm_user_model.py`` beside this test (outside gradkit)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradkit
from gradkit.cli import main
from gradkit.compress import check_gradients, measure_activations
from gradkit.errors import ConfigError
from gradkit.likelihood_ratio import per_sample_loss
from gradkit.losses import cross_entropy
from gradkit.methods import build
from gradkit.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread is far faster

VOCAB, CONTEXT = 12, 8
SMALL = ["--data", "digits", "--limit-train", "64", "--limit-test", "32", "--batch-size", "16", "--epochs", "1",
         "--threads", "1", "--no-progress"]


def _tiny() -> nn.Sequential:
    torch.manual_seed(0)
    return build_model("gpt", (CONTEXT,), VOCAB, layers=2, width=16, heads=2)


def _tokens(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (n, CONTEXT), generator=g), torch.randint(0, VOCAB, (n, CONTEXT), generator=g)


# -- (a) the default loss on logits that do not fit the targets ----------------------------------------
@pytest.mark.parametrize(
    ("logits", "targets", "expected"),
    [
        ((4, 8, 12), (4,), "per-token logits (4, 8, 12) (N, T, V), which need targets (N, T) = (4, 8), but the "
                           "targets are (4,): the data has one label per example"),
        ((4, 8, 12), (4, 9), "make the model's sequence length and the data's agree"),
        ((4, 12), (4, 8), "class logits (4, 12) (N, C), which need one label per example (4,), but the targets "
                          "are (4, 8) (next tokens?): use a model that returns per-token logits"),
    ],
)
def test_default_loss_names_both_shapes_and_the_fix(logits: tuple[int, ...], targets: tuple[int, ...],
                                                    expected: str) -> None:
    with pytest.raises(ConfigError, match=r"^[^\n]*$") as info:
        cross_entropy(torch.randn(logits), torch.zeros(targets, dtype=torch.long))
    assert expected in str(info.value)


def test_default_loss_refuses_a_target_outside_the_classes() -> None:
    with pytest.raises(ConfigError, match="Target 12 is out of bounds.*12 outputs per prediction"):
        cross_entropy(torch.randn(2, 3, 12), torch.full((2, 3), 12))


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("lm_user_model:per_token", "the model returned per-token logits (16, 4, 10) (N, T, V), which need targets"),
        ("lm_user_model:logits_and_loss", "the model returned a tuple, not a tensor of logits"),
    ],
)
def test_cli_says_it_in_one_line(model: str, expected: str, tmp_path: object,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "train", "--model", model, *SMALL, "--out", f"{tmp_path}/run"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert expected in err


def test_a_model_that_cannot_read_the_data_fails_before_training_in_one_line(
        tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    # A flat-input mlp given token ids: torch's "mat1 and mat2 must have the same dtype" used to be a
    # traceback from the first step; one probe forward now names the model, the data and the dtype.
    assert main(["-q", "train", "--model", "mlp", "--data", "text", "--limit-train", "32", "--limit-test", "8",
                 "--batch-size", "16", "--epochs", "1", "--threads", "1", "--no-progress",
                 "--out", f"{tmp_path}/run"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "model mlp cannot read the examples of text (int64, shape (64,))" in err

    def ten_features(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(10, num_classes))  # digits are (1, 8, 8): no flatten, 10 != 8

    with pytest.raises(ConfigError, match=r"model .*ten_features cannot read the examples of digits "
                                          r"\(float32, shape \(1, 8, 8\)\): mat1 and mat2 shapes"):
        gradkit.train(gradkit.TrainConfig(model=ten_features, data="digits", epochs=1, threads=1, progress=False))


# -- (b) ulr with a per-token loss ------------------------------------------------------------------------
def _flat_per_token(out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """How a user writes a per-token loss: one value per token, flattened, under reduction='none'."""
    return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction=reduction)


def test_per_token_losses_become_per_sample_means() -> None:
    out, y = torch.randn(4, CONTEXT, VOCAB), _tokens()[1]
    expected = cross_entropy(out, y, reduction="none")
    torch.testing.assert_close(per_sample_loss(_flat_per_token, out, y), expected)  # (N*T,) -> (N,)
    as_grid = per_sample_loss(lambda o, t, reduction: _flat_per_token(o, t, reduction).view(4, -1), out, y)
    torch.testing.assert_close(as_grid, expected)  # (N, T) -> (N,)
    with pytest.raises(ConfigError, match="one loss per sample.*returned shape \\(\\)"):
        per_sample_loss(lambda o, t, reduction: _flat_per_token(o, t), out, y)  # ignores reduction


@pytest.mark.parametrize("stages", [1, 2])
def test_ulr_with_a_per_token_loss_equals_the_default_loss(stages: int) -> None:
    """The user's flattened per-token loss gives the same estimate as gradkit's per-token default."""
    x, y = _tokens()
    grads = []
    for loss_fn in (None, _flat_per_token):
        model = _tiny()
        parts = gradkit.split(model, stages, balance="count") if stages > 1 else [model]
        method = build("ulr", parts, loss_fn=loss_fn, copies=4)
        torch.manual_seed(1)
        method.estimate(x, y)  # type: ignore[attr-defined]
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


# -- (c) cDNI with per-token labels -----------------------------------------------------------------------
def test_cdni_trains_on_per_token_labels() -> None:
    x, y = _tokens(8)
    method = build("dni", gradkit.split(_tiny(), 2, balance="count"), conditioned=True)
    losses = [method.step(x, y) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    synthesizer = method.pipeline_stages[0].synthesizer  # type: ignore[attr-defined]
    assert synthesizer.num_classes == VOCAB  # the vocabulary, not the sequence length


def test_cdni_refuses_per_token_labels_at_a_vector_boundary() -> None:
    model = nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(CONTEXT, 16)),
                          nn.Sequential(nn.Linear(16, CONTEXT * VOCAB), nn.Unflatten(1, (CONTEXT, VOCAB))))
    method = build("dni", gradkit.split(model, 2, balance="count"), conditioned=True)
    x, y = _tokens()
    with pytest.raises(ConfigError, match=r"labels \(4, 8\) do not fit a \(16,\) boundary: drop -o conditioned"):
        method.step(x.float(), y)


# -- (d) check_gradients / measure_activations on language models -----------------------------------------
class _TakesTargets(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gpt = _tiny()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(self.gpt(idx), targets)


class _ReturnsLogitsAndLoss(_TakesTargets):
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return self.gpt(idx), None


def test_compression_checks_take_a_language_model() -> None:
    x, y = _tokens()
    assert len(check_gradients(_tiny(), (x, y), "int8")) > 0
    assert measure_activations(_tiny(), x, y, "int8").exact_bytes > 0


@pytest.mark.parametrize(
    ("model", "expected"),
    [(_TakesTargets, "_TakesTargets.forward needs idx, targets: pass a module whose forward\\(x\\) returns the "
                     "logits"),
     (_ReturnsLogitsAndLoss, "the model returned a tuple, not a tensor of logits")],
)
def test_compression_checks_refuse_a_model_taking_targets(model: type[nn.Module], expected: str) -> None:
    x, y = _tokens()
    with pytest.raises(ConfigError, match=expected):
        check_gradients(model(), (x, y), "int4")
    with pytest.raises(ConfigError, match=expected):
        measure_activations(model(), x, y, "int4")
