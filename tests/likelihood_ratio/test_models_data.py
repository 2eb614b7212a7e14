"""Models and data added for ULR: recurrent, graph and spiking nets; AG News and graph datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradkit.cli import main
from gradkit.data import BatchLoader, load_dataset
from gradkit.data.ag_news import SEQ_LEN
from gradkit.errors import ConfigError
from gradkit.likelihood_ratio import LikelihoodRatioConfig, LikelihoodRatioEstimator
from gradkit.methods import build
from gradkit.models import build_model
from gradkit.models.recurrent import Recurrent
from gradkit.models.spiking import SpikeFn


def cosines(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **options: object) -> list[float]:
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    truth = [p.grad.clone() for p in model.parameters()]
    torch.manual_seed(0)
    LikelihoodRatioEstimator([model], F.cross_entropy, LikelihoodRatioConfig(**options)).estimate(x, y)
    return [float(F.cosine_similarity(p.grad.flatten(), t.flatten(), dim=0)) for p, t in zip(model.parameters(), truth, strict=True)]


@pytest.mark.parametrize("kind, reference", [("rnn", nn.RNN), ("gru", nn.GRU), ("lstm", nn.LSTM)])
def test_recurrent_layer_equals_torch(kind: str, reference: type) -> None:
    torch.manual_seed(0)
    ours, theirs = Recurrent(kind, 5, 7), reference(5, 7, batch_first=True)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        getattr(theirs, f"{name}_l0").data.copy_(getattr(ours, name))
    x = torch.randn(3, 6, 5)
    torch.testing.assert_close(ours(x), theirs(x)[0][:, -1], rtol=1e-5, atol=1e-5)


def test_recurrent_estimates_with_noise_per_step_point_along_the_gradient() -> None:
    torch.manual_seed(0)
    model = build_model("lstm", (1, 6), 3, vocab_size=20, embed=8, hidden=8)
    x, y = torch.randint(1, 20, (16, 1, 6)).float(), torch.randint(0, 3, (16,))
    # embedding, weight_ih, weight_hh, bias_ih, bias_hh, head weight, head bias (measured >= 0.9)
    assert min(cosines(model, x, y, copies=256)) > 0.7


def test_recurrent_weight_noise_variant_points_along_the_gradient() -> None:
    torch.manual_seed(0)
    model = build_model("rnn", (1, 6), 3, vocab_size=20, embed=8, hidden=8)
    x, y = torch.randint(1, 20, (16, 1, 6)).float(), torch.randint(0, 3, (16,))
    # One weight draw per copy for the whole sequence: unbiased too, only noisier.
    assert min(cosines(model, x, y, copies=256, inject="weight")[1:3]) > 0.2


def test_gcn_on_karate_trains_with_bp_and_ulr_estimates_both_graph_layers() -> None:
    pytest.importorskip("networkx")
    ds = load_dataset("karate")
    assert ds.info.input_shape == (1,) and len(ds.train_y) + len(ds.test_y) == 34
    torch.manual_seed(0)
    model = build_model("gcn", ds.info.input_shape, ds.info.num_classes, **ds.model_args)
    x, y = ds.train_x, ds.train_y
    assert min(cosines(model, x, y, copies=512)) > 0.7
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        assert (model(ds.test_x).argmax(1) == ds.test_y).float().mean() > 0.8
    with pytest.raises(ConfigError, match="--data karate"):
        build_model("gcn", (1, 28, 28), 10)


def test_spiking_net_trains_with_ulr_and_never_uses_the_surrogate() -> None:
    ds = load_dataset("synthetic")
    torch.manual_seed(0)
    model = build_model("snn", ds.info.input_shape, 10, hidden=(32,), steps=4)
    method = build("ulr", [model], copies=32, sigma=0.05,
                   optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    loader = BatchLoader(ds.train_x, ds.train_y, ds.info, 100, train=True, seed=0)
    calls = SpikeFn.backward_calls
    for epoch in range(3):
        for x, y in loader.epoch(epoch):
            method.step(x, y)
    assert SpikeFn.backward_calls == calls  # the spike function was never differentiated
    test = BatchLoader(ds.test_x, ds.test_y, ds.info, 500, train=False)
    x, y = next(iter(test.epoch(0)))
    acc = float((method.predict(x).argmax(1) == y).float().mean())
    assert acc > 0.5, acc  # chance is 0.1


def test_snn_backprop_uses_the_surrogate() -> None:
    model = build_model("snn", (1, 8, 8), 10, hidden=(16,), steps=3, conv=True, channels=(4,))
    calls = SpikeFn.backward_calls
    F.cross_entropy(model(torch.rand(4, 1, 8, 8)), torch.arange(4)).backward()
    assert SpikeFn.backward_calls > calls
    assert model.conv1.conv.module.weight.grad.abs().sum() > 0  # through two spiking layers


def write_csv(folder: Path, name: str, rows: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("\n".join(rows) + "\n")


def test_ag_news_reads_both_layouts_with_a_deterministic_vocabulary(tmp_path: Path) -> None:
    small = tmp_path / "ag_news_small"
    write_csv(small, "train.csv", ['0,"war talks in Cairo, war"', "1,cup final goal goal", "2,stocks fall", "3,new chip"])
    write_csv(small, "test.csv", ["1,goal for war", "3,unseen words"])
    ds = load_dataset("ag-news", tmp_path)
    assert ds.train_y.tolist() == [0, 1, 2, 3]
    assert ds.model_args == {"vocab_size": 4}  # pad, unk, "goal", "war" (seen twice)
    goal, war = 2, 3  # equal counts: alphabetical
    assert ds.test_x[0, 0, -3:].tolist() == [goal, 1, war]  # left-padded, "for" is unknown
    assert ds.test_x.shape == (2, 1, SEQ_LEN) and ds.test_x[0, 0, 0] == 0

    official = tmp_path / "other" / "ag_news_csv"
    write_csv(official, "train.csv", ['"3","Wall St.","Stocks fall again"', '"1","Talks","war"'])
    write_csv(official, "test.csv", ['"2","Cup","final"'])
    ds2 = load_dataset("ag-news", tmp_path / "other")
    assert ds2.train_y.tolist() == [2, 0] and ds2.test_y.tolist() == [1]


def test_ag_news_development_subset(shared_datasets: Path) -> None:
    ds = load_dataset("ag-news", shared_datasets)
    assert len(ds.train_y) == 4000 and len(ds.test_y) == 4000
    assert torch.bincount(ds.train_y).tolist() == [1000] * 4
    model = build_model("gru", ds.info.input_shape, 4, **ds.model_args)
    assert model(ds.train_x[:3]).shape == (3, 4)


def test_cora_text_files(tmp_path: Path) -> None:
    folder = tmp_path / "cora"
    folder.mkdir()
    content = [f"p{i} {i % 2} {(i + 1) % 2} 1 {'A' if i < 25 else 'B'}" for i in range(50)]
    (folder / "cora.content").write_text("\n".join(content) + "\n")
    (folder / "cora.cites").write_text("p0 p1\np1 p2\np3 p99\n")
    ds = load_dataset("cora", tmp_path)
    assert len(ds.train_y) == 40 and len(ds.test_y) == 10  # 20 per class, the rest (< 1000) to test
    graph = ds.model_args["graph"]
    assert graph.features.shape == (50, 3) and graph.edges.shape == (2, 2)  # p99 is not a node
    torch.testing.assert_close(graph.features.sum(1), torch.ones(50))
    model = build_model("gcn", ds.info.input_shape, 2, **ds.model_args)
    assert model(ds.train_x).shape == (40, 2)


def test_diagnose_and_evaluate_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagnose", "--model", "mlp", "--data", "synthetic", "--json", "-o", "copies=32"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in result["layers"]] == ["hidden1.fc", "hidden2.fc", "head.fc"]
    assert result["layers"][-1]["cosine"] > 0.8
    run = tmp_path / "run"
    assert main(["-q", "train", "--model", "mlp", "--data", "synthetic", "--epochs", "1", "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--attack", "fgsm", "--eps", "0.2", "--json", str(run)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["attacked_acc"] < out["clean_acc"]
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--attack", "blur", "--eps", "0.1", str(run)])
    assert exit_info.value.code == 2
    assert main(["evaluate", "--attack", "fgsm", "--eps", "-1", str(run)]) == 2
