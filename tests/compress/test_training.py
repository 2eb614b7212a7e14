"""--activations in real training: the loop, the CLI, other methods, accumulation, LSTM, Transformer."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradkit
from gradkit.cli import main
from gradkit.compress import MODES, Activations, check_gradients
from gradkit.config import ACTIVATION_MODES
from gradkit.errors import ConfigError


def test_config_modes_mirror_the_registry_and_bad_values_are_one_line_errors(capsys) -> None:
    assert tuple(MODES) == ACTIVATION_MODES
    with pytest.raises(ConfigError, match="int3.*choose one of"):
        gradkit.TrainConfig(activations="int3")
    with pytest.raises(ConfigError, match="unknown activation option 'bits'"):
        Activations(nn.Linear(2, 2), "int4", bits=3)
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", "unused", "--activations", "int3"])
    assert exc.value.code == 2
    assert "int3" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--activation-group-size must be a positive multiple of 8"):
        gradkit.TrainConfig(activations="int4", activation_group_size=12)


def test_activation_group_size_reaches_the_quantiser() -> None:
    """Smaller groups: one float16 range per 64 values instead of per 256, i.e. more stored bytes."""
    stored = {}
    for size in (256, 64):
        config = gradkit.TrainConfig(model="cnn", data="synthetic", epochs=1, batch_size=32, limit_train=64,
                                     limit_test=32, activations="int4", activation_group_size=size,
                                     progress=False)
        stored[size] = gradkit.train(config).final["activation_bytes"]
    assert stored[64] > stored[256]


@pytest.mark.parametrize("method,stages", [("bp", 1), ("fr", 2)])
def test_train_loop_with_int4_stores_less_and_learns(method: str, stages: int) -> None:
    results = {}
    for mode in ("exact", "int4"):
        config = gradkit.TrainConfig(method=method, stages=stages, model="resnet20", data="synthetic",
                                     epochs=2, batch_size=32, limit_train=128, limit_test=100,
                                     activations=mode, progress=False)
        results[mode] = gradkit.train(config)
    exact, int4 = results["exact"], results["int4"]
    assert int4.final["activation_bytes"] < exact.final["activation_bytes"] / 3
    # Same data, seed and schedule: the compressed run learns like the exact one.
    assert int4.final["train_loss"] < int4.history[0]["train_loss"]
    assert int4.final["test_acc"] > 0.3  # 10 classes
    assert abs(int4.final["test_acc"] - exact.final["test_acc"]) < 0.25


def test_gradient_accumulation_matches_exact() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
    batches = [(torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))) for _ in range(2)]
    grads = []
    for mode in ("exact", "int8"):
        model.zero_grad()
        act = Activations(model, mode)
        for x, y in batches:  # two micro-batches, one optimizer step's worth of gradient
            with act:
                loss = F.cross_entropy(model(x), y) / 2
            loss.backward()
        act.close()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert F.cosine_similarity(grads[0], grads[1], dim=0) > 0.999


def test_resnet20_gradients_per_layer_on_a_cifar10_batch(shared_datasets) -> None:
    data = gradkit.data.load_dataset("cifar10", shared_datasets, limit_train=64, limit_test=1)
    loader = gradkit.data.BatchLoader(data.train_x, data.train_y, data.info, 64, train=True, seed=0)
    x, y = next(iter(loader.epoch(0)))
    torch.manual_seed(0)
    model = gradkit.build_model("resnet20", (3, 32, 32), 10)
    for mode, bound in (("int8", 0.99), ("blpa8", 0.99), ("int4", 0.95), ("blpa4", 0.95)):
        layers = check_gradients(model, (x, y), mode)
        assert len(layers) == 43  # every conv, BN and the classifier
        worst = min(layers, key=lambda r: r.cosine)
        assert worst.cosine >= bound, (mode, worst)


class _LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        self.lstm = nn.LSTM(32, 64, batch_first=True)
        self.fc = nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(x))
        return self.fc(out[:, -1])


class _TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        self.block = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, activation="gelu")
        self.fc = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.embed(x)).mean(dim=1))


@pytest.mark.parametrize("make", [_LSTMClassifier, _TinyTransformer])
def test_lstm_and_transformer_train_through_the_generic_path(make: type[nn.Module]) -> None:
    """Label = whether token 7 occurs: both learn it under int4, and their activations are packed."""
    torch.manual_seed(0)
    x = torch.randint(0, 100, (256, 24))
    y = (x == 7).any(dim=1).long()
    model = make()
    act = Activations(model, "int4")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with act, act.recording() as records:
        F.cross_entropy(model(x[:64]), y[:64]).backward()
    assert sum(r.kind == "int4" for r in records) >= 3
    losses = []
    for step in range(60):
        xb, yb = x[(step % 4) * 64:(step % 4 + 1) * 64], y[(step % 4) * 64:(step % 4 + 1) * 64]
        with act:
            loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-8:]) / 8 < 0.6 * sum(losses[:8]) / 8


def test_memory_command_json(capsys) -> None:
    assert main(["memory", "--model", "resnet20", "--data", "synthetic", "--batch-size", "16",
                 "--activations", "int4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"exact_bytes", "stored_bytes", "ratio"}
    assert report["ratio"] >= 7.0 and report["exact_bytes"] > report["stored_bytes"] > 0
    assert main(["memory", "--model", "cnn", "--data", "synthetic", "--batch-size", "8",
                 "--activations", "exact,int8"]) == 0
    out = capsys.readouterr().out
    assert "exact_bytes" in out and "int8" in out
