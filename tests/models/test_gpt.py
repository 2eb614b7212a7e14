"""``gpt`` on ``text``: shapes, causality, the tied embedding, per-token loss, and training with bp and
the pipelined methods (``--stages 2``) and low-bit activations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gradkit
from gradkit.losses import cross_entropy
from gradkit.models import build_model
from gradkit.models.gpt import GPTEmbedding, GPTHead
from gradkit.stages import split

TINY = {"layers": 2, "width": 32, "heads": 2}


def _tied(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    embed, head = model.get_submodule("embed"), model.get_submodule("head")
    assert isinstance(embed, GPTEmbedding) and isinstance(head, GPTHead)
    return embed.token.weight, head.proj.weight


def test_blocks_shapes_and_the_tied_weight() -> None:
    torch.manual_seed(0)
    model = build_model("gpt", (32,), 50, **TINY)
    assert list(model._modules) == ["embed", "block1", "block2", "head"]
    embedding, head = _tied(model)
    assert head is embedding
    assert model(torch.randint(0, 50, (3, 32))).shape == (3, 32, 50)
    first, last = split(model, 2, balance="count")
    assert any(p is embedding for p in first.parameters())
    assert any(p is embedding for p in last.parameters())


def test_attention_is_causal() -> None:
    torch.manual_seed(0)
    model = build_model("gpt", (16,), 20, **TINY).eval()
    ids = torch.randint(0, 20, (2, 16))
    changed = ids.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 20
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_default_loss_is_per_token_cross_entropy() -> None:
    logits, targets = torch.randn(4, 8, 11), torch.randint(0, 11, (4, 8))
    flat = F.cross_entropy(logits.reshape(32, 11), targets.reshape(32))
    torch.testing.assert_close(cross_entropy(logits, targets), flat)
    per_sequence = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(dim=1)
    torch.testing.assert_close(cross_entropy(logits, targets, reduction="none"), per_sequence)
    two_d = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    torch.testing.assert_close(cross_entropy(*two_d), F.cross_entropy(*two_d))


@pytest.mark.parametrize(
    ("method", "stages", "activations"),
    [("bp", 1, "exact"), ("fr", 2, "exact"), ("ddg", 2, "exact"), ("bp", 1, "int4"), ("fr", 2, "int4")],
)
def test_tiny_gpt_learns_characters(method: str, stages: int, activations: str, shared_datasets: Path) -> None:
    config = gradkit.TrainConfig(
        method=method, stages=stages, model="gpt", data="text", activations=activations, model_options=TINY,
        data_dir=str(shared_datasets), data_options={"context": 32}, limit_train=400, limit_test=100, batch_size=16, epochs=1,
        optimizer="adam", lr=3e-3, weight_decay=0.0, lr_schedule="constant", threads=1, progress=False,
    )
    losses: list[float] = []
    result = gradkit.train(config, on_step=lambda epoch, step, loss: losses.append(loss))
    assert all(math.isfinite(v) for v in losses)
    assert result.model is not None
    vocab = _tied(result.model)[0].shape[0]
    assert losses[0] == pytest.approx(math.log(vocab), abs=0.3)  # uniform guesses at the start
    assert sum(losses[-5:]) / 5 < losses[0] - 0.7  # falling: character frequencies at least
    final = result.final
    assert final["test_bpc"] == pytest.approx(final["test_loss"] / math.log(2))
    assert final["test_bpc"] < math.log2(vocab) - 1
    assert 0.1 < final["test_acc"] < 1  # per-token accuracy (spaces and 'e' at least)


def test_text_runs_report_loss_and_bits_per_character_instead_of_accuracy(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """The epoch lines, the final line of `gradkit train` and the `gradkit compare` table of a language
    model lead with the per-token loss and bits per character (issue 14: not accuracy)."""
    from gradkit.cli import main
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over a lazy dog " * 30, encoding="utf-8")
    common = ["--model", "gpt", "--model-option", "layers=1", "--model-option", "width=16", "--model-option",
              "heads=2", "--data", "text", "--data-option", f"path={text}", "--data-option", "context=8",
              "--limit-train", "64", "--limit-test", "16", "--batch-size", "16", "--epochs", "1",
              "--optimizer", "adam", "--threads", "1", "--no-progress"]
    assert main(["train", *common, "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr()
    final = [line for line in out.out.splitlines() if line.startswith("bp gpt on text:")]
    assert len(final) == 1 and "test_bpc" in final[0] and "test_acc" not in final[0]
    epoch = [line for line in (out.out + out.err).splitlines() if line.startswith("epoch 1:")]
    assert len(epoch) == 1 and "test_bpc" in epoch[0] and "test_acc" not in epoch[0]
    assert main(["compare", *common, "--methods", "bp,fr:2", "--out", str(tmp_path / "cmp")]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("method"))
    assert header.split()[:5] == ["method", "test", "loss", "test", "bpc"] and "acc" not in header
