"""The generic path: what is packed, what is left alone, storages once, overrides, masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradkit.compress import ActivationCompressor, Activations


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))


def _record(comp: ActivationCompressor, model: nn.Module, x: torch.Tensor) -> tuple[list, torch.Tensor]:
    comp.start_recording()
    with comp:
        loss = model(x).square().mean()
    return comp.stop_recording(), loss


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_relu_mask_bit_exact_through_generic_hooks(bits: int) -> None:
    x = torch.randn(16, 4096, requires_grad=True)
    with ActivationCompressor(None, bits):
        y = F.relu(x)
    y.sum().backward()
    assert torch.equal(x.grad, (x > 0).float())


def test_what_is_left_alone_and_storage_saved_once() -> None:
    model = _net()
    x = torch.randn(4, 3, 16, 16)
    records, loss = _record(ActivationCompressor(model, 4), model, x)
    kinds = {r.module: r.kind for r in records}
    by_kind = [r.kind for r in records]
    # The input batch is a leaf the caller holds: kept. Parameters are never offered as activations.
    assert kinds["0"] == "leaf"
    assert all(r.shape not in {tuple(p.shape) for p in model.parameters()} for r in records)
    # The ReLU output is saved by the ReLU and by the next conv, but stored (and recorded) once.
    relu_out = [r for r in records if r.shape == (4, 8, 16, 16) and r.module == "1"]
    assert len(relu_out) == 1 and relu_out[0].kind == "int4"
    # Max-pool indices (int64) are narrowed losslessly, never quantised.
    assert "int64->int16" in by_kind
    loss.backward()  # the shared ReLU output decodes for both readers


def test_shared_storage_decoded_once_for_both_readers(monkeypatch: pytest.MonkeyPatch) -> None:
    from gradkit.compress import _quant

    calls = []
    real = _quant.unpack
    monkeypatch.setattr(_quant, "unpack", lambda p: calls.append(p) or real(p))
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    comp = ActivationCompressor(model, 8, min_numel=16)
    with comp:
        out = model(torch.randn(32, 64))
        # Only the ReLU output is an activation here (the input is a leaf); ReLU and Linear both save it.
        assert [v[1]().readers for v in comp._seen.values()] == [2]
    out.sum().backward()
    assert len(calls) == 1


def test_integer_bool_tiny_and_parameter_copies_left_alone() -> None:
    lin = nn.Linear(256, 256)
    comp = ActivationCompressor(lin, 4)
    comp.start_recording()
    x = torch.randn(64, 256, requires_grad=True)
    with comp, torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(x * 2)  # autocast saves a bf16 copy of the weight: a parameter, not an activation
        idx = torch.randint(0, 64, (4096,))
        g = h.float().reshape(-1)[idx]  # gather saves its int64 index
        small = h[:2, :3].float().exp()  # tiny: kept
        loss = g.sum() + small.sum() + (h.float() > 0).float().sum()
    records = comp.stop_recording()
    kinds = [r.kind for r in records]
    assert "param" not in kinds  # never offered to the record: parameters and their casts are skipped
    assert not any(r.shape == (256, 256) for r in records)
    assert "tiny" in kinds and any(k.startswith("int4") for k in kinds)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_per_module_overrides() -> None:
    model = _net()
    comp = ActivationCompressor(model, 2, overrides={"1": None, "5": 8})
    records, _ = _record(comp, model, torch.randn(4, 3, 16, 16))
    kind = {r.module: r.kind for r in records if r.kind != "tiny" and r.dtype == torch.float32}
    assert kind["1"] == "exact"         # the first ReLU's output kept in full precision
    assert kind["5"] == "int8"          # the classifier's input in higher precision
    assert kind["3"] == "int2"          # the rest at the default width (max-pool input)
    comp.close()
    assert not model[1]._forward_pre_hooks


def test_loss_outside_the_model_is_kept_exact() -> None:
    # The loss's saved log-softmax output starts every gradient; quantising it (here 2560 values,
    # above min_numel) would corrupt all of them. The last layer's bias gradient depends on it alone.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    x, y = torch.randn(256, 32), torch.randint(0, 10, (256,))
    F.cross_entropy(model(x), y).backward()
    exact = model[2].bias.grad.clone()
    model.zero_grad()
    comp = ActivationCompressor(model, 2)
    comp.start_recording()
    with comp:
        loss = F.cross_entropy(model(x), y)
    records = comp.stop_recording()
    loss.backward()
    assert torch.allclose(model[2].bias.grad, exact, rtol=1e-5, atol=1e-7)
    assert [r.shape for r in records if r.kind == "outside"] == [(256, 10)]
    assert any(r.kind == "int2" and r.module == "1" for r in records)  # inside: still compressed


def test_no_grad_eval_saves_nothing_and_runs() -> None:
    model = _net().eval()
    act = Activations(model, "int4")
    with act, act.recording() as records, torch.no_grad():
        out = model(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 10) and records == []


def test_reference_option_matches_fast_path_gradients() -> None:
    model = _net()
    x = torch.randn(8, 3, 16, 16)
    grads = []
    for reference in (False, True):
        model.zero_grad()
        with ActivationCompressor(model, 8, rounding="nearest", reference=reference):
            loss = model(x).square().mean()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)
