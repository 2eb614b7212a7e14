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
