"""The ``--activations`` modes and the object that applies one to a model for a training step."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

import torch
from torch import nn

from gradkit.compress import _quant
from gradkit.compress._blpa import apply_blpa, remove_blpa
from gradkit.compress._hooks import ActivationCompressor, SavedRecord
from gradkit.errors import ConfigError

__all__ = ["ATTENTION_BITS", "MODES", "ModeSpec", "Activations", "parse_attention_bits", "parse_mode"]

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class ModeSpec:
    name: str
    bits: int | None
    blpa: bool = False
    naive: bool = False
    help: str = ""
    attention_bits: int | None = None
    """The ``attention_bits`` of ``attention_bits="auto"``: at least this width for attention's saved
    tensors (:mod:`._rules`), None for no rule."""


MODES: dict[str, ModeSpec] = {
    m.name: m
    for m in (
        ModeSpec("exact", None, help="full-precision activations (plain backprop)"),
        ModeSpec("blpa8", 8, blpa=True, help="BN->ReLU->Conv units keep 8-bit x̂ codes (Chakrabarti & "
                 "Moseley 2019); other saved tensors 8-bit generic"),
        ModeSpec("blpa4", 4, blpa=True, help="as blpa8 with 4-bit codes (~8x less activation memory)"),
        ModeSpec("int8", 8, help="every saved activation as 8-bit per-group codes (GACT-style)"),
        ModeSpec("int4", 4, help="every saved activation as 4-bit per-group codes"),
        # int2 breaks attention once it is trained (median gradient cosine 0.57 after 300 steps of a
        # GPT, 0.94 with attention at 8 bits; int4 0.99): see _rules.
        ModeSpec("int2", 2, attention_bits=8, help="every saved activation as 2-bit per-group codes "
                 "(ActNN-style); attention's inputs and outputs at 8 bits"),
        ModeSpec("naive8", 8, naive=True, help="baseline: activations quantised to 8 bits in the forward "
                 "pass too (the comparison in the BLPA paper)"),
    )
}

_OPTION_KEYS = ("group_size", "rounding", "min_numel", "reference", "overrides", "attention_bits")

ATTENTION_BITS = ("auto", "off", "exact", "2", "4", "8")
"""Values of ``attention_bits`` / ``--attention-bits``: the mode's default (8 for int2, none for the
others), no rule (attention at the mode's width), exact, or at least 2, 4 or 8 bits."""


def parse_mode(name: str) -> ModeSpec:
    """The :class:`ModeSpec` called ``name``; a one-line :class:`ConfigError` otherwise."""
    spec = MODES.get(name)
    if spec is None:
        raise ConfigError(f"unknown --activations {name!r}; choose one of: {', '.join(MODES)}")
    return spec


def parse_attention_bits(value: object, mode: str = "int2") -> int | str | None:
    """``attention_bits`` (one of :data:`ATTENTION_BITS`, or the int 2, 4, 8) for ``mode``, as
    :class:`ActivationCompressor` takes it: a width, ``"exact"``, or None (no rule).

    Raises:
        ConfigError: any other value.
    """
    text = str(value).strip().lower() if not isinstance(value, bool) else ""
    if text not in ATTENTION_BITS:
        raise ConfigError(f"--attention-bits {value!r} is not one of {', '.join(ATTENTION_BITS)}; "
                          "e.g. 8 (attention at 8 bits) or off (attention at the mode's width)")
    if text == "auto":
        return parse_mode(mode).attention_bits
    if text == "off":
        return None
    return "exact" if text == "exact" else int(text)


def _fake_quant_hook(bits: int, group_size: int) -> Any:
    def hook(_m: nn.Module, _args: Any, out: Any) -> Any:
        if not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.numel() < group_size:
            return out
        with torch.no_grad():
            q = _quant.unpack(_quant.pack(out, bits, group_size=group_size, rounding="nearest"))
        # Straight-through: the forward sees the 8-bit value, the gradient passes unchanged.
        return out + (q - out).detach()

    return hook


_NAIVE_TYPES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU,
                nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


class Activations:
    """One ``--activations`` mode applied to ``model``: ``with act: loss = method.step(x, y)``, or
    ``step = act.wrap(method.step)``.

    Building it prepares the model once (the blpa modes route residual blocks through the fused
    BatchNorm->ReLU->Conv function, naive8 adds forward hooks that quantise activations); entering it
    installs the saved-tensor hooks for the step. ``exact`` costs nothing: entering is a no-op.

    Args:
        model: the model being trained.
        mode: a name from :data:`MODES`.
        options: ``group_size`` (256), ``rounding`` ("stochastic"/"nearest"), ``min_numel`` (1024),
            ``reference`` (use the pure-PyTorch reference pack/unpack), ``overrides`` (module name ->
            bits or None, e.g. ``{"stem": 8, "head": None}``), ``attention_bits`` (``"auto"``: the
            mode's, 8 for int2, else none; ``"off"``; ``"exact"``; 2, 4 or 8: attention's saved
            tensors get at least that width, see :mod:`gradkit.compress._rules`). Whatever a loss
            function saves is always kept exact, inside the model's forward too.

    Raises:
        ConfigError: unknown mode or option, or a bad option value.
    """

    def __init__(self, model: nn.Module, mode: str = "exact", **options: Any) -> None:
        self.spec = parse_mode(mode)
        unknown = sorted(set(options) - set(_OPTION_KEYS))
        if unknown:
            raise ConfigError(f"unknown activation option {unknown[0]!r}; known: {', '.join(_OPTION_KEYS)}")
        self.model = model
        self.options = options
        self.blpa_blocks = 0
        self._naive_handles: list[Any] = []
        self.compressor: ActivationCompressor | None = None
        if self.spec.bits is None and not options.get("overrides"):
            return
        overrides: Mapping[str, int | None] = options.get("overrides") or {}
        self.attention_bits = parse_attention_bits(options.get("attention_bits", "auto"), mode)
        try:
            self.compressor = ActivationCompressor(
                model, self.spec.bits,
                group_size=int(options.get("group_size", 256)),
                # The paper's quantiser is deterministic: blpa modes round to nearest by default.
                rounding=str(options.get("rounding", "nearest" if self.spec.blpa else "stochastic")),
                min_numel=int(options.get("min_numel", 1024)),
                overrides=overrides,
                reference=bool(options.get("reference", False)),
                attention_bits=self.attention_bits,
            )
        except ValueError as exc:
            raise ConfigError(f"--activations {mode}: {exc}") from None
        if self.spec.blpa:
            assert self.spec.bits is not None
            self.blpa_blocks = apply_blpa(model, self.spec.bits)
        if self.spec.naive:
            assert self.spec.bits is not None
            hook = _fake_quant_hook(self.spec.bits, int(options.get("group_size", 256)))
            for m in model.modules():
                if isinstance(m, _NAIVE_TYPES):
                    self._naive_handles.append(m.register_forward_hook(hook))

    @property
    def name(self) -> str:
        return self.spec.name

    def close(self) -> None:
        """Undo every change made to the model."""
        if self.spec.blpa:
            remove_blpa(self.model)
        for h in self._naive_handles:
            h.remove()
        self._naive_handles.clear()
        if self.compressor is not None:
            self.compressor.close()

    def __enter__(self) -> Activations:
        if self.compressor is not None:
            self.compressor.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.compressor is not None:
            self.compressor.__exit__(exc_type, exc, tb)

    def wrap(self, fn: Callable[P, R]) -> Callable[P, R]:
        """``fn`` run inside this context: the training loop's one way of applying the mode.

        Every backend wraps the method's step (and ``flush``, whose drain steps train too) this way.
        The wrapped function is what ``gradkit.memory.measure_step`` and the direction diagnostics
        call, so the compressor's hooks are innermost and report what they store to an enclosing
        meter. ``exact`` returns ``fn`` itself.
        """
        if self.compressor is None:
            return fn

        @functools.wraps(fn)
        def within(*args: P.args, **kwargs: P.kwargs) -> R:
            with self:
                return fn(*args, **kwargs)

        return within

    @contextlib.contextmanager
    def recording(self, exclude: list[torch.Tensor] | None = None) -> Any:
        """Within the step run inside this block, record every saved tensor; yields the list.

        For ``exact`` a plain recorder (bits None) is used, so the same accounting applies to all modes.
        """
        comp = self.compressor
        temporary = comp is None
        if comp is None:
            comp = ActivationCompressor(self.model, None)
        if exclude:
            comp.exclude(exclude)
        records: list[SavedRecord] = []
        comp.start_recording()
        try:
            if temporary:
                with comp:
                    yield records
            else:
                yield records
        finally:
            records.extend(comp.stop_recording())
            if temporary:
                comp.close()
