"""Peak memory follows stored memory: what the hooks hold after the forward, and how many decoded
copies are alive at once in the backward (weak references to every decoded tensor)."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradkit.compress import ActivationCompressor, _hooks, _quant
from gradkit.models import build_model


class _DecodedCounter:
    """Counts decoded tensors alive (by weak reference) and the most alive at once, with their bytes."""

    def __init__(self) -> None:
        self.alive: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}
        self.calls = 0
        self.most = 0
        self.most_bytes = 0

    def track(self, t: torch.Tensor) -> None:
        self.calls += 1
        key = id(t)
        self.alive[key] = (weakref.ref(t, lambda _r, k=key: self.alive.pop(k, None)), t.nbytes)
        self.most = max(self.most, len(self.alive))
        self.most_bytes = max(self.most_bytes, sum(b for _, b in self.alive.values()))


@contextmanager
def _count_decoded(monkeypatch: pytest.MonkeyPatch) -> Iterator[_DecodedCounter]:
    counter = _DecodedCounter()
    real = _quant.unpack

    def unpack(p: _quant.Packed) -> torch.Tensor:
        out = real(p)
        counter.track(out)
        return out

    monkeypatch.setattr(_quant, "unpack", unpack)
    yield counter


def _conv_relu_stack() -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()]
    for _ in range(5):
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 12 * 12, 10))


@pytest.mark.parametrize("model_name", ["conv_relu_stack", "resnet20"])
def test_at_most_two_decoded_copies_alive_in_the_backward(model_name: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Every conv's input is also its ReLU's output (two readers, one decode): the decoded copy must be
    dropped after its last reader, so at most two are alive at any moment (the one being read and the
    next one), and none after the backward."""
    torch.manual_seed(0)
    if model_name == "resnet20":
        model: nn.Module = build_model("resnet20", (3, 12, 12), 10)
    else:
        model = _conv_relu_stack()
    x, y = torch.randn(4, 3, 12, 12), torch.randint(0, 10, (4,))
    comp = ActivationCompressor(model, 4, min_numel=256)
    with _count_decoded(monkeypatch) as counter:
        with comp:
            out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
    assert counter.calls >= 6
    assert counter.most <= 2, counter.most
    assert counter.most_bytes <= 2 * 4 * 16 * 12 * 12 * 4  # two of the largest activations (float32)
    assert not counter.alive  # nothing decoded survives the backward


def test_three_readers_one_decode_dropped_after_the_last(monkeypatch: pytest.MonkeyPatch) -> None:
    """An activation read by three operations is decoded once, and released after the third read."""
    a, b, c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)
    comp = ActivationCompressor(None, 8, min_numel=16)  # no model: nothing counts as "outside" it
    comp.exclude([p for m in (a, b, c) for p in m.parameters()])
    made: list[weakref.ref[Any]] = []
    real_pack = comp._pack

    def pack(t: torch.Tensor) -> Any:
        out = real_pack(t)
        if isinstance(out, _hooks._Shared):
            made.append(weakref.ref(out))
        return out

    monkeypatch.setattr(comp, "_pack", pack)
    x = torch.randn(32, 64, requires_grad=True)
    with _count_decoded(monkeypatch) as counter:
        with comp:
            h = torch.relu(x * 2)  # saved by relu (output), a, b and c: four readers
            out = a(h).sum() + b(h).sum() + c(h).sum()
            shared = {id(r()) for r in made if r() is not None}
            assert len(shared) == 1
            assert next(r() for r in made if r() is not None).readers == 4
        out.backward()
    assert counter.calls == 1
    assert not counter.alive


def test_hooks_hold_only_codes_after_the_forward_and_free_them_in_a_backward_inside_with(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """After the forward: every packed activation's full-precision tensor is gone, and the hooks hold
    only codes and ranges (bytes <= stored bytes of the records, ~1/7 of exact at 4 bits). A backward
    run inside the ``with`` block frees the codes as it goes (the compressor keeps no strong reference)."""
    torch.manual_seed(0)
    model = build_model("resnet20", (3, 12, 12), 10)
    x, y = torch.randn(4, 3, 12, 12), torch.randint(0, 10, (4,))
    comp = ActivationCompressor(model, 4, min_numel=256)
    originals: list[weakref.ref[torch.Tensor]] = []
    held: list[weakref.ref[Any]] = []
    real_pack = comp._pack

    def pack(t: torch.Tensor) -> Any:
        out = real_pack(t)
        if isinstance(out, _hooks._Shared):
            originals.append(weakref.ref(t))
            held.append(weakref.ref(out))
        return out

    monkeypatch.setattr(comp, "_pack", pack)
    comp.start_recording()
    with comp:
        out = model(x)
        records = comp.stop_recording()
        loss = F.cross_entropy(out, y)
        assert len(originals) > 20
        assert all(r() is None for r in originals)  # no full-precision copy survives the forward
        live = {id(s): s.packed.nbytes for s in (r() for r in held) if s is not None}
        stored = sum(r.stored_bytes for r in records if r.kind == "int4")
        exact = sum(r.exact_bytes for r in records if r.kind == "int4")
        assert 0 < sum(live.values()) <= stored <= exact / 6
        loss.backward()
        assert all(r() is None for r in held)  # codes freed by the backward, still inside `with`
