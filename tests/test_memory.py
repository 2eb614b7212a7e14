"""gradkit.memory counts bytes saved for backward: parameters excluded, storages once."""

from __future__ import annotations

import torch
from torch import nn

from gradkit.memory import SavedTensorsMeter, measure_step, tensor_bytes
from gradkit.methods import build


def test_linear_relu_saved_bytes_by_hand() -> None:
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(10, 20), nn.Linear(20, 3)
    x = torch.randn(7, 10)
    with SavedTensorsMeter(exclude=[*lin1.parameters(), *lin2.parameters()]) as meter:
        h = torch.relu(lin1(x))
        out = lin2(h)
    # Saved: the input x (for lin1's weight grad) and the ReLU output h, which ReLU saves for its
    # mask and lin2 saves for its weight grad: one storage, counted once. Weights are excluded.
    assert meter.bytes == 7 * 10 * 4 + 7 * 20 * 4
    assert len(meter.tensors) == 2
    out.sum().backward()  # the hooks passed tensors through unchanged


def test_nothing_is_saved_without_grad() -> None:
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU())
    with torch.no_grad(), SavedTensorsMeter(exclude=model.parameters()) as meter:
        model(torch.randn(4, 10))
    assert meter.bytes == 0


def test_parameters_are_excluded_only_when_listed() -> None:
    lin = nn.Linear(10, 20, bias=False)
    x = torch.randn(3, 10, requires_grad=True)
    with SavedTensorsMeter() as counted:
        lin(x)
    with SavedTensorsMeter(exclude=lin.parameters()) as excluded:
        lin(x)
    assert counted.bytes - excluded.bytes == 20 * 10 * 4


def test_measure_step_reports_bp_activations() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU()), nn.Linear(32, 4))
    method = build("bp", [model])
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 4, (8,))
    loss, report = measure_step(method, x, y)
    assert loss > 0
    # x (flattened view of the input storage), ReLU output, plus the logits/targets the loss saves.
    assert report.saved_bytes >= 8 * 16 * 4 + 8 * 32 * 4
    assert report.buffer_bytes == 0
    assert report.activation_bytes == report.saved_bytes
    assert report.peak_cuda_bytes is None


def test_tensor_bytes_counts_views_once() -> None:
    t = torch.zeros(100)
    assert tensor_bytes([t, t[:10], t.view(10, 10)]) == 400


# -- CUDA step peak and the largest-batch search (their logic, with fakes: no GPU needed) -------------
class FakeStats:
    """A CUDA allocator stand-in: ``run`` allocates ``step`` bytes on top of ``held``."""

    def __init__(self, held: int) -> None:
        self.held, self.high = held, held
        self.synced = 0

    def sync(self) -> None:
        self.synced += 1

    def allocated(self) -> int:
        return self.held

    def reset_peak(self) -> None:
        self.high = self.held

    def peak(self) -> int:
        return self.high


def test_step_peak_is_the_peak_during_the_step_less_what_was_held_before() -> None:
    from gradkit.memory import step_peak_bytes
    stats = FakeStats(held=1000)
    stats.high = 10**9  # an earlier, larger peak must not count

    def run() -> None:
        stats.high = stats.held + 300

    assert step_peak_bytes(run, stats) == 300  # type: ignore[arg-type]
    assert stats.synced == 2


def _oom_above(limit: int, per_sample: int = 10):  # noqa: ANN202
    calls: list[int] = []

    def trial(b: int) -> int:
        calls.append(b)
        if b > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return b * per_sample

    return trial, calls


def test_largest_batch_doubles_then_bisects_to_the_out_of_memory_edge() -> None:
    from gradkit.memory import largest_batch
    trial, calls = _oom_above(300)
    found = largest_batch(trial, None, start=16)
    assert found.batch == 300 and found.peak_bytes == 3000
    assert calls[:6] == [16, 32, 64, 128, 256, 512]  # doubling, then bisection between 256 and 512
    assert len(calls) <= 6 + 8
    assert found.tried[5] == (512, None)


def test_largest_batch_stops_at_the_budget() -> None:
    from gradkit.memory import largest_batch
    trial, _ = _oom_above(10**6)
    found = largest_batch(trial, budget_bytes=1234, start=1)
    assert found.batch == 123 and found.peak_bytes == 1230
    nothing = largest_batch(trial, budget_bytes=5, start=1)
    assert nothing.batch == 0 and nothing.peak_bytes is None
    capped = largest_batch(trial, None, start=1, limit=64)
    assert capped.batch == 64


def test_max_batch_on_cpu_is_a_one_line_error(capsys) -> None:  # noqa: ANN001
    from gradkit.cli import main
    assert main(["memory", "--model", "cnn", "--data", "synthetic", "--max-batch", "--budget-mb", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--max-batch needs CUDA" in err and len(err.splitlines()) == 1


def test_max_batch_command_searches_per_mode_and_reports_json(monkeypatch, capsys) -> None:  # noqa: ANN001
    """The CLI's plumbing on CPU: the CUDA check and the measured peak are replaced by a fake whose
    peak is 1000 bytes a sample, so a 100 KB budget fits exactly 102 samples."""
    import json

    from gradkit.cli import main
    from gradkit.cli import memory as memory_cli
    sizes: list[int] = []

    def fake_peak(model, x, y, mode, precision, options, stats):  # noqa: ANN001, ANN202
        sizes.append(int(x.shape[0]))
        assert x.shape[1:] == (1, 8, 8) and y.shape == x.shape[:1]
        return int(x.shape[0]) * 1000

    monkeypatch.setattr(memory_cli, "_is_cuda", lambda device: True)
    monkeypatch.setattr(memory_cli, "_peak", fake_peak)
    assert main(["memory", "--model", "cnn", "--data", "synthetic", "--batch-size", "8", "--activations",
                 "exact,int4", "--max-batch", "--budget-mb", str(102_400 / 2**20), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["mode"] for r in rows] == ["exact", "int4"]
    assert all(r["max_batch"] == 102 and r["peak_bytes"] == 102_000 for r in rows)
    assert sizes[:5] == [8, 16, 32, 64, 128]


def test_max_batch_tries_real_token_batches_on_a_language_model(monkeypatch, capsys, tmp_path) -> None:  # noqa: ANN001
    """--max-batch on gpt + text tries batches of the data's integer token ids with per-token targets
    (random floats would fail in the embedding), repeating the loaded examples to each size."""
    import json

    from gradkit.cli import main
    from gradkit.cli import memory as memory_cli
    text = tmp_path / "t.txt"
    text.write_text("abcdefgh " * 200, encoding="utf-8")
    tried: list[tuple[int, torch.dtype, tuple[int, ...]]] = []

    def cpu_peak(model, x, y, mode, precision, options, stats):  # noqa: ANN001, ANN202
        tried.append((int(x.shape[0]), x.dtype, tuple(y.shape)))
        # The real step runs (an embedding lookup fails on floats); its peak is faked: 1000 B a sample.
        memory_cli._step(model, x, y, mode, precision, options)
        return int(x.shape[0]) * 1000

    monkeypatch.setattr(memory_cli, "_is_cuda", lambda device: True)
    monkeypatch.setattr(memory_cli, "_peak", cpu_peak)
    monkeypatch.setattr(memory_cli, "CudaMemoryStats", lambda device: None)
    monkeypatch.setattr(memory_cli.torch.cuda, "empty_cache", lambda: None)
    assert main(["memory", "--model", "gpt", "--model-option", "layers=1", "--model-option", "width=16",
                 "--model-option", "heads=2", "--data", "text", "--data-option", f"path={text}",
                 "--data-option", "context=8", "--batch-size", "4", "--activations", "int4", "--max-batch",
                 "--budget-mb", str(20_000 / 2**20), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["max_batch"] == 20
    assert tried[0] == (4, torch.int64, (4, 8)) and all(d == torch.int64 and y == (b, 8) for b, d, y in tried)
