"""The generic path: every tensor autograd saves for backward becomes a packed low-bit copy.

Built on ``torch.autograd.graph.saved_tensors_hooks``, as GACT (Liu et al., "GACT: Activation
Compressed Training for Generic Network Architectures", ICML 2022) does, so it covers any architecture
(Linear, Conv, LSTM, attention, LayerNorm, GELU...) without per-layer code. The forward pass is exact;
only the copies kept for backward are approximate (Chakrabarti & Moseley, NeurIPS 2019).

What is left alone, because compressing it would free nothing or break something:
parameters and buffers (and autocast's cast copies of them), leaves such as the user's input batch,
integer and bool tensors (indices, masks; int64 ones are narrowed losslessly to int16/int32 when
their values fit, e.g. max-pool indices), tiny tensors (BatchNorm statistics, scalars), and the
loss: when the compressor knows the model, whatever is saved outside the model's forward, and, inside
it too, whatever a loss function saves (:mod:`._rules`). The loss's log-softmax output is where every
gradient starts, and a 4-bit copy of it put ~30% relative error into every layer's gradient of
ResNet-20 (4.5% when it is kept; benchmarks/approx-activations).
Attention's saved tensors get at least ``attention_bits`` (:mod:`._rules` says which and why).
A tensor saved by several operations (a ReLU output saved by the ReLU and by the next conv) is packed
once and decoded once: the decoded copy is shared until its last reader has taken it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import nn

from gradkit.compress import _quant
from gradkit.compress._rules import Regions

__all__ = ["ActivationCompressor", "SavedRecord"]


# Gradient functions of casts and views: a chain of these ending at a parameter is a copy of it.
_PARAM_PATH = frozenset({"ToCopyBackward0", "TBackward0", "TransposeBackward0", "PermuteBackward0",
                         "ViewBackward0", "UnsafeViewBackward0", "ExpandBackward0"})


@dataclass(frozen=True)
class SavedRecord:
    """One distinct tensor saved for backward while recording."""

    module: str
    """Name of the innermost module running when it was saved ("" outside any)."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    exact_bytes: int
    stored_bytes: int
    kind: str
    """``int4`` etc. when packed, ``int64->int16`` when narrowed losslessly, else why it was kept:
    ``leaf``, ``int``, ``tiny``, ``outside`` (saved outside the model's forward), ``loss`` (saved by a
    loss function inside it), ``exact``."""
    rule: str = ""
    """``attention`` when the attention rule widened it beyond the mode's bits, else empty."""


class _Shared:
    """A packed tensor and the bookkeeping that lets several readers share one decode."""

    __slots__ = ("packed", "readers", "decoded", "reference", "__weakref__")

    def __init__(self, packed: _quant.Packed, reference: bool) -> None:
        self.packed = packed
        self.readers = 1
        self.decoded: torch.Tensor | None = None
        self.reference = reference

    def take(self) -> torch.Tensor:
        """The decoded tensor for one reader. ``readers`` counts the saved variables (one per reader)
        that hold this object, at pack time; the shared decoded copy is held here only until the last
        of them has taken it, so at most one decoded copy per shared activation is alive, and only
        between its first and last reader in the backward."""
        decoded = self.decoded
        if decoded is None:
            decoded = (_quant.unpack_reference if self.reference else _quant.unpack)(self.packed)
        self.readers -= 1
        # Keep the decoded copy only while another reader will still ask for it.
        self.decoded = decoded if self.readers > 0 else None
        return decoded


def _drop(stack: list[Any]) -> None:
    # A forward hook that returned the popped item would replace the module's output.
    stack.pop()


class _Narrowed:
    """An int64 tensor (max-pool indices, embedding ids) stored losslessly in a narrower integer type."""

    __slots__ = ("data",)

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data


def _narrow(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as int16/int32 when every value fits, else None (lossless; restored to int64)."""
    lo, hi = int(t.min()), int(t.max())
    for dtype in (torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return t.to(dtype)
    return None


def _unpack(saved: Any) -> torch.Tensor:
    if isinstance(saved, _Shared):
        return saved.take()
    if isinstance(saved, _Narrowed):
        return saved.data.to(torch.int64)
    return saved


class ActivationCompressor:
    """Context manager: inside it, tensors saved for backward are stored as packed ``bits``-bit codes.

    Example:
        >>> compressor = ActivationCompressor(model, bits=4)
        >>> with compressor:
        ...     loss = loss_fn(model(x), y)
        >>> loss.backward()  # reads decoded low-bit copies

    Args:
        model: its parameters and buffers are never compressed; ``overrides`` name its modules.
        bits: 2, 4 or 8 (None keeps everything exact, useful with overrides).
        group_size: elements per quantisation group (one range each).
        rounding: ``"stochastic"`` (unbiased, the default, as ActNN) or ``"nearest"``.
        min_numel: tensors with fewer elements are kept exact (their ranges would cost more).
        overrides: module name (as in ``model.named_modules()``) -> bits (2, 4, 8) or None (exact)
            for tensors saved while that module runs, e.g. ``{"stem": 8, "head": None}``.
        reference: decode/encode with the pure-PyTorch reference implementation.
        attention_bits: at least this width for attention's saved tensors (:mod:`._rules`): 2, 4, 8,
            or ``"exact"``; None (default) gives attention the same width as everything else. A
            floor: an override to exact stays exact.
    """

    def __init__(
        self,
        model: nn.Module | None,
        bits: int | None,
        *,
        group_size: int = 256,
        rounding: str = "stochastic",
        min_numel: int = 1024,
        overrides: Mapping[str, int | None] | None = None,
        reference: bool = False,
        attention_bits: int | str | None = None,
    ) -> None:
        if bits is not None and bits not in _quant.BITS:
            raise ValueError(f"bits must be one of {_quant.BITS} or None, got {bits}")
        if attention_bits is not None and attention_bits != "exact" and attention_bits not in _quant.BITS:
            raise ValueError(f"attention bits must be 2, 4, 8 or 'exact', got {attention_bits!r}")
        _quant._check(bits or 8, group_size, rounding)
        self.model = model
        self.bits = bits
        self.group_size = group_size
        self.rounding = rounding
        self.min_numel = min_numel
        self.reference = reference
        self.attention_bits = attention_bits
        self._bits_stack: list[int | None] = []
        self._names: list[str] = []
        self._handles: list[Any] = []
        self._record_handles: list[Any] = []
        self._excluded: set[int] = set()
        # Weak both ways: the packed copy lives exactly as long as autograd's saved variables hold it,
        # so a backward run inside the ``with`` block frees codes as it goes, as one run after it does.
        self._seen: dict[tuple[Any, ...], tuple[weakref.ref[torch.Tensor], weakref.ref[_Shared]]] = {}
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self._outer: Any = None
        # Attention and loss calls in progress, seen while compressing (exact recorders need neither).
        self._regions: Regions | None = None
        self.records: list[SavedRecord] | None = None
        # How many of the model's own forward calls are running: tensors saved at depth 0 (the loss,
        # user code around the model) are kept exact. Not counted when no model is given.
        self._depth = 0
        if model is not None:
            self._install_depth_hooks(model)
        if overrides:
            self._install_overrides(overrides)
        if bits is not None or overrides:
            self._regions = Regions(inside_model=lambda: self._depth > 0 or self.model is None)
        # The rules' TorchFunctionMode costs a Python call per torch call (ResNet-56 int8 step, batch 2,
        # CPU: 149 ms against 116 ms without it). It watches until every module the depth hooks see has
        # run once; if no attention or loss call happened inside the model by then, it is dropped.
        # Its children (pipelines run them without the root), or the root when it has none.
        self._watching: set[int] = set()
        self._must_run = ({id(m) for m in model.children()} or {id(model)}) if model is not None else set()

    # -- set-up -----------------------------------------------------------------------------------
    def _install_depth_hooks(self, model: nn.Module) -> None:
        # The root and its direct children: pipeline methods run the children without the root.
        for module in (model, *model.children()):
            self._handles.append(module.register_forward_pre_hook(self._enter_model))
            self._handles.append(module.register_forward_hook(self._leave_model, always_call=True))

    def _enter_model(self, m: nn.Module, _args: Any) -> None:
        self._depth += 1
        if self._regions is not None and self._regions.active:
            self._watching.add(id(m))

    def _rules_settled(self) -> bool:
        """Whether the rules can be dropped: every child (or the root) has run under the rules' mode,
        and none of them called attention or a loss."""
        regions = self._regions
        if regions is None or regions.hits or not self._must_run:
            return False
        return self._must_run <= self._watching

    def _leave_model(self, _m: nn.Module, _args: Any, _out: Any) -> None:
        self._depth = max(0, self._depth - 1)

    def _install_overrides(self, overrides: Mapping[str, int | None]) -> None:
        if self.model is None:
            raise ValueError("per-module overrides need the model")
        modules = dict(self.model.named_modules())
        for name, bits in overrides.items():
            if name not in modules:
                known = ", ".join(n for n in list(modules)[:12] if n)
                raise ValueError(f"no module named {name!r} to override; modules include: {known}")
            if bits is not None and bits not in _quant.BITS:
                raise ValueError(f"override bits for {name!r} must be 2, 4, 8 or None, got {bits}")
            module = modules[name]
            self._handles.append(module.register_forward_pre_hook(
                lambda _m, _a, b=bits: self._bits_stack.append(b)))
            self._handles.append(module.register_forward_hook(
                lambda _m, _a, _o: _drop(self._bits_stack)))

    def close(self) -> None:
        """Remove the hooks this compressor put on the model."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def exclude(self, tensors: Iterable[torch.Tensor]) -> None:
        """Never compress these tensors' storages (beyond the model's parameters and buffers)."""
        self._excluded.update(t.untyped_storage().data_ptr() for t in tensors)

    # -- recording (for `gradkit memory` and the first step's report) ------------------------------
    def start_recording(self) -> None:
        """Record every saved tensor (with the module that saved it) until :meth:`stop_recording`."""
        self.records = []
        self._record_storages: dict[int, int] = {}
        if self.model is not None:
            for name, module in self.model.named_modules():
                self._record_handles.append(module.register_forward_pre_hook(
                    lambda _m, _a, n=name: self._names.append(n)))
                self._record_handles.append(module.register_forward_hook(
                    lambda _m, _a, _o: _drop(self._names)))

    def stop_recording(self) -> list[SavedRecord]:
        for h in self._record_handles:
            h.remove()
        self._record_handles.clear()
        self._names.clear()
        records, self.records = self.records or [], None
        return records

    @property
    def stored_bytes(self) -> int:
        return sum(r.stored_bytes for r in self.records or [])

    def _record(self, t: torch.Tensor, stored: int, kind: str, rule: str = "") -> None:
        assert self.records is not None
        storage = t.untyped_storage()
        if kind in ("int", "tiny", "leaf", "outside", "loss", "exact"):
            # Kept tensors stay alive until backward, so their address identifies them; packed ones
            # are recorded once, when first packed (their freed address may be reused later).
            ptr = storage.data_ptr()
            if ptr in self._record_storages:
                return
            self._record_storages[ptr] = storage.nbytes()
        module = self._names[-1] if self._names else ""
        self.records.append(SavedRecord(module, tuple(t.shape), t.dtype, storage.nbytes(), stored, kind, rule))

    # -- the hooks --------------------------------------------------------------------------------
    def __enter__(self) -> ActivationCompressor:
        excluded = set(self._excluded)
        if self.model is not None:
            for t in (*self.model.parameters(), *self.model.buffers()):
                excluded.add(t.untyped_storage().data_ptr())
        self._step_excluded = excluded
        self._seen.clear()
        self._depth = 0
        # An outer meter (gradkit.memory.SavedTensorsMeter) would be shadowed by these hooks; instead
        # it is shown what is really stored: kept tensors, and the codes and ranges of packed ones.
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        self._outer = top[0] if top is not None else None
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._hooks.__enter__()
        if self._regions is not None:
            self._regions.clear()
            self._regions.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._hooks is not None
        if self._regions is not None:
            self._regions.__exit__(exc_type, exc, tb)
            self._regions.clear()
            if exc_type is None and self._rules_settled():
                self._regions = None
        self._hooks.__exit__(exc_type, exc, tb)
        self._hooks = None
        self._seen.clear()

    def _keep_reason(self, t: torch.Tensor) -> str | None:
        if t.untyped_storage().data_ptr() in self._step_excluded:
            return "param"
        if not t.is_floating_point():
            return "int"
        if t.numel() < self.min_numel:
            return "tiny"
        if self._depth == 0 and self.model is not None:
            return "outside"
        if self._regions is not None and self._regions.loss:
            return "loss"
        fn = t.grad_fn
        if fn is None:
            # A leaf (the input batch, a detached stage boundary): whoever made it still holds it.
            return "leaf"
        if type(fn).__name__ in _PARAM_PATH and self._is_param_copy(fn):
            return "param"
        return None

    def _is_param_copy(self, fn: Any) -> bool:
        """Whether ``fn`` only casts/reshapes a parameter (autocast's bf16 copy of a weight, or its
        transpose): compressing that would free nothing the step needs, and it is not an activation."""
        for _ in range(4):
            if type(fn).__name__ not in _PARAM_PATH or len(fn.next_functions) != 1:
                return False
            fn = fn.next_functions[0][0]
            variable = getattr(fn, "variable", None)
            if variable is not None:
                return variable.untyped_storage().data_ptr() in self._step_excluded
        return False

    def _attention_floor(self, t: torch.Tensor, bits: int) -> int | None:
        """``bits``, widened to ``attention_bits`` (None: exact) when ``t`` is attention's."""
        regions, floor = self._regions, self.attention_bits
        if floor is None or regions is None or (floor != "exact" and int(floor) <= bits):
            return bits
        if not (regions.attention or regions.from_attention(t)):
            return bits
        return None if floor == "exact" else int(floor)

    def _pack(self, t: torch.Tensor) -> Any:
        reason = self._keep_reason(t)
        bits = self._bits_stack[-1] if self._bits_stack else self.bits
        rule = ""
        if reason is None and bits is not None:
            widened = self._attention_floor(t, bits)
            if widened != bits:
                bits, rule = widened, "attention"
        if reason is None and bits is None:
            reason = "exact"
        if reason == "int" and t.dtype == torch.int64 and t.numel() >= self.min_numel and bits is not None:
            narrow = _narrow(t)
            if narrow is not None:
                if self.records is not None:
                    self._record(t, narrow.untyped_storage().nbytes(), f"int64->{str(narrow.dtype)[6:]}")
                if self._outer is not None:
                    self._outer(narrow)
                return _Narrowed(narrow)
        if reason is not None:
            if self.records is not None and reason != "param":
                self._record(t, t.untyped_storage().nbytes(), reason, rule)
            if self._outer is not None:
                self._outer(t)
            return t
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        hit = self._seen.get(key)
        # The weak reference proves the storage is still the same one (its address cannot be reused
        # while the tensor lives), so a hit really is the same activation.
        if hit is not None and hit[0]() is t:
            shared = hit[1]()
            if shared is not None:
                shared.readers += 1
                return shared
        assert bits is not None  # None was turned into reason "exact" above
        pack = _quant.pack_reference if self.reference else _quant.pack
        packed = pack(t, bits, group_size=self.group_size, rounding=self.rounding)
        shared = _Shared(packed, self.reference)
        self._seen[key] = (weakref.ref(t), weakref.ref(shared))
        if self._outer is not None:
            for part in (packed.data, packed.lo, packed.step):
                self._outer(part)
        if self.records is not None:
            self._record(t, packed.nbytes, f"int{bits}", rule)
        return shared
