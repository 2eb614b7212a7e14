"""The unified likelihood-ratio (ULR) gradient estimate of a whole model, from forward passes only.

Jiang, Zhang, Xu, Yu, Peng, "One Forward is Enough for Neural Network Training via Likelihood Ratio
Method" (ICLR 2024). One training step:

1. a clean forward in training mode (no graph), which gives the reported loss and updates BatchNorm's
   running statistics once;
2. when the model has BatchNorm/Dropout, a clean forward in eval mode: the noisy copies run BatchNorm on
   running statistics (with batch statistics BN nets collapse), so the baseline and the layer inputs must
   come from the same function;
3. noisy passes: layer-wise (default) one pass per layer, with that layer's copies stacked into one batch
   and only the blocks from that layer on re-run, chunked to a memory budget; or all layers at once;
4. each layer's estimate ``J_W(x)ᵀ Σ (L - b) ε / σ`` goes to ``.grad`` (see
   :mod:`gradkit.likelihood_ratio.layers`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradkit.errors import ConfigError
from gradkit.likelihood_ratio.layers import NoisyLayer, find_layers, flat_blocks, local_grads
from gradkit.likelihood_ratio.noise import SAMPLERS, draw_noise
from gradkit.models._layers import has_eval_modules

__all__ = [
    "LikelihoodRatioConfig", "LikelihoodRatioEstimator", "per_sample_loss", "BASELINES", "INJECTIONS"
]

BASELINES = ("clean", "antithetic", "none")
INJECTIONS = ("logit", "weight")
LossFn = Callable[..., torch.Tensor]


@dataclass
class LikelihoodRatioConfig:
    """Options of the estimate (the ``ulr`` method's ``-o KEY=VALUE`` options)."""

    copies: int | Sequence[int] = 64
    """Noisy copies per layer: one number, or one per layer in forward order."""
    sigma: float | Sequence[float] = 0.01
    """Noise standard deviation per layer: one number, or one per layer."""
    inject: str = "logit"
    """``logit``: noise on layer outputs; ``weight``: noise on the weights (one draw per copy)."""
    layerwise: bool = True
    """One noisy pass per layer (far lower variance) instead of noise in every layer at once."""
    baseline: str = "clean"
    """``clean`` (subtract each sample's un-noised loss), ``antithetic`` (±ε pairs) or ``none``."""
    sampler: str = "normal"
    """``normal`` or ``qmc`` (scrambled Sobol through the inverse normal CDF)."""
    adaptive_sigma: bool = False
    """Learn each layer's log σ from its own likelihood-ratio gradient ``E[(L - b)(ε² - 1)]``."""
    sigma_lr: float = 0.01
    """Step on log σ per training step when ``adaptive_sigma``."""
    memory_budget_mb: float = 256.0
    """Bound on the activations of one chunk of stacked copies."""

    def validate(self) -> None:
        """Raises ConfigError naming the bad option."""
        if self.inject not in INJECTIONS:
            raise ConfigError(f"ulr option inject={self.inject!r} is unknown; use one of: {', '.join(INJECTIONS)}")
        if self.baseline not in BASELINES:
            raise ConfigError(f"ulr option baseline={self.baseline!r} is unknown; use one of: {', '.join(BASELINES)}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"ulr option sampler={self.sampler!r} is unknown; use one of: {', '.join(SAMPLERS)}")
        if not (self.memory_budget_mb > 0):
            raise ConfigError(f"ulr option memory_budget_mb must be > 0, got {self.memory_budget_mb}")
        if not (self.sigma_lr >= 0):
            raise ConfigError(f"ulr option sigma_lr must be >= 0, got {self.sigma_lr}")


def per_layer(values: Any, n: int, option: str, names: Sequence[str], cast: type) -> list[Any]:
    """One value per layer from a number, a sequence, or text like ``64,64,16``."""
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    seq = list(values) if isinstance(values, Sequence) else [values] * n
    if len(seq) == 1:
        seq = seq * n
    if len(seq) != n:
        raise ConfigError(
            f"ulr option {option} has {len(seq)} values but the model has {n} layers "
            f"({', '.join(names)}); give one value or {n}"
        )
    try:
        out = [cast(v) for v in seq]
    except (TypeError, ValueError):
        raise ConfigError(f"ulr option {option}={values!r} must be numbers") from None
    if any(not (v > 0) or (isinstance(v, float) and not math.isfinite(v)) for v in out):
        raise ConfigError(f"ulr option {option}={values!r} must be positive")
    return out


def per_sample_loss(loss_fn: LossFn, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss of each sample, ``(N,)`` for ``N = len(y)`` (the estimator weights samples separately).

    A loss that returns more than one value per sample with ``reduction='none'`` (per token: ``(N, T)``,
    or flattened ``(N*T,)`` as ``F.cross_entropy(out.flatten(0, 1), y.flatten())`` gives) is reduced
    to each sample's mean, the per-sample share of a batch-mean loss.

    Raises:
        ConfigError: the loss function cannot return per-sample losses.
    """
    try:
        loss = loss_fn(out, y, reduction="none")
    except TypeError:
        raise ConfigError(
            "ulr needs per-sample losses: give a loss_fn that accepts reduction='none' (as torch's losses do)"
        ) from None
    n = y.shape[0]
    if loss.dim() == 0 or loss.numel() % n:
        raise ConfigError(
            f"ulr needs one loss per sample (or per token) from loss_fn(..., reduction='none'); for a batch of "
            f"{n} it returned shape {tuple(loss.shape)}: pass reduction through to the torch loss"
        )
    return loss.reshape(n, -1).mean(1) if loss.numel() != n else loss.reshape(n)


def repeat_copies(t: torch.Tensor, copies: int) -> torch.Tensor:
    """``t`` stacked ``copies`` times along the batch, copy-major (row ``c*B + n``)."""
    return t.unsqueeze(0).expand(copies, *t.shape).reshape(copies * t.shape[0], *t.shape[1:])


@dataclass
class _LayerState:
    """What the engine keeps per layer across steps: its σ (learned when adaptive) and an RMS of its
    log-σ gradient for the normalised adaptive step."""

    log_sigma: float
    log_sigma0: float
    grad_sq: float = 0.0


@dataclass
class _Pass:
    """Results of one clean forward."""

    block_inputs: list[torch.Tensor]
    layer_inputs: dict[int, torch.Tensor]
    loss: torch.Tensor
    block_numel: list[int] = field(default_factory=list)
    layer_outputs: dict[int, torch.Tensor] = field(default_factory=dict)


class LikelihoodRatioEstimator:
    """Fills ``.grad`` of every trainable parameter of ``stages`` with the ULR estimate.

    Args:
        stages: model partitions (their top-level blocks are run one after another).
        loss_fn: ``loss_fn(output, target, reduction=...)``.
        config: the estimate's options.
    """

    def __init__(
        self, stages: Sequence[nn.Module], loss_fn: LossFn, config: LikelihoodRatioConfig
    ) -> None:
        config.validate()
        self.config = config
        self.loss_fn = loss_fn
        self.blocks, self.block_names, _ = flat_blocks(stages)
        self.layers: list[NoisyLayer] = find_layers(stages)
        if not self.layers:
            raise ConfigError("ulr found no trainable parameters in the model")
        names = [layer.name for layer in self.layers]
        copies = per_layer(config.copies, len(self.layers), "copies", names, int)
        sigmas = per_layer(config.sigma, len(self.layers), "sigma", names, float)
        if config.baseline == "antithetic" and any(c % 2 for c in copies):
            raise ConfigError(f"baseline=antithetic needs an even number of copies, got copies={config.copies}")
        self.state: list[_LayerState] = []
        for layer, c, s in zip(self.layers, copies, sigmas, strict=True):
            layer.copies, layer.sigma = c, s
            self.state.append(_LayerState(math.log(s), math.log(s)))
        self.has_eval_modules = has_eval_modules(self.blocks)
        self.forward_passes = 0.0
        """Sample-forwards of the last step, in units of one full forward of the batch (for reports)."""

    # -- public ---------------------------------------------------------------------------------
    def estimate(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Fill ``.grad`` with the estimate for one batch; returns the clean training loss."""
        with torch.no_grad():
            clean = self._clean_pass(x, y, capture=not self.has_eval_modules)
        loss = clean.loss.mean().item()
        modes = self._set_eval()
        try:
            with torch.no_grad():
                ref = self._clean_pass(x, y, capture=True) if self.has_eval_modules else clean
            grads: dict[int, torch.Tensor] = {}
            self.forward_passes = 1.0 + (1.0 if self.has_eval_modules else 0.0)
            with torch.no_grad():
                if self.config.layerwise or self.config.inject == "weight":
                    for i in range(len(self.layers)):
                        self._layer_pass([i], ref, y, grads)
                else:
                    self._layer_pass(list(range(len(self.layers))), ref, y, grads)
        finally:
            self._restore(modes)
        for layer in self.layers:
            for _, p in layer.params():
                p.grad = grads.get(id(p), torch.zeros_like(p))
        return loss

    def sigmas(self) -> dict[str, float]:
        """Current σ of each layer."""
        return {layer.name: layer.sigma for layer in self.layers}

    def state_dict(self) -> dict[str, Any]:
        return {"log_sigma": [s.log_sigma for s in self.state], "grad_sq": [s.grad_sq for s in self.state]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for layer, st, ls, gs in zip(self.layers, self.state, state["log_sigma"], state["grad_sq"], strict=True):
            st.log_sigma, st.grad_sq = float(ls), float(gs)
            layer.sigma = math.exp(st.log_sigma)

    # -- passes ---------------------------------------------------------------------------------
    def _clean_pass(self, x: torch.Tensor, y: torch.Tensor, *, capture: bool) -> _Pass:
        inputs: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}
        handles: list[RemovableHandle] = []
        if capture:
            for i, layer in enumerate(self.layers):
                if not layer.stepwise:
                    handles.append(layer.module.register_forward_pre_hook(_capture(inputs, i)))
                    handles.append(layer.module.register_forward_hook(_capture_output(outputs, i)))
        block_inputs, numel = [], []
        try:
            h = x
            for block in self.blocks:
                block_inputs.append(h)
                h = block(h)
                numel.append(h.numel())
        finally:
            for handle in handles:
                handle.remove()
        return _Pass(block_inputs, inputs, per_sample_loss(self.loss_fn, h, y), numel, outputs)

    def _chunk(self, start_block: int, ref: _Pass, copies: int) -> int:
        """Copies per chunk so that one chunk's activations (about 4x the block outputs, plus what
        per-step layers record) stay within the memory budget."""
        per_copy = 16 * sum(ref.block_numel[start_block:])
        per_copy += 4 * sum(
            int(getattr(layer.module, "noise_record_numel", 0)) for layer in self.layers
            if layer.stepwise and layer.block >= start_block
        )
        chunk = max(1, int(self.config.memory_budget_mb * 2**20 // max(per_copy, 1)))
        chunk = min(chunk, copies)
        if self.config.baseline == "antithetic":
            chunk = max(2, chunk - chunk % 2)
        return chunk

    def _layer_pass(self, idx: list[int], ref: _Pass, y: torch.Tensor, grads: dict[int, torch.Tensor]) -> None:
        """Noisy passes with noise in layers ``idx`` (one layer, or all of them at once)."""
        cfg = self.config
        layers = [self.layers[i] for i in idx]
        start = min(layer.block for layer in layers)
        copies = max(layer.copies for layer in layers)
        batch = y.shape[0]
        chunk = self._chunk(start, ref, copies)
        acc: dict[int, _Accum] = {i: _Accum() for i in idx}
        done = 0
        while done < copies:
            c = min(chunk, copies - done)
            if cfg.baseline == "antithetic" and c % 2:
                c += 1
            records: dict[int, _Record] = {i: _Record() for i in idx}
            with self._inject(idx, records, c, batch, ref):
                h = repeat_copies(ref.block_inputs[start], c)
                for block in self.blocks[start:]:
                    h = block(h)
                losses = per_sample_loss(self.loss_fn, h, repeat_copies(y, c))
            # Counted as full forwards, although a copy re-runs only what follows its layer.
            self.forward_passes += c
            w = losses.view(c, batch)
            if cfg.baseline == "clean":
                w = w - ref.loss.view(1, batch)
            for i in idx:
                self._accumulate(i, acc[i], records[i], w, ref)
            done += c
        for i in idx:
            self._finish(i, acc[i], copies, batch, ref, grads)

    @contextmanager
    def _inject(self, idx: list[int], records: dict[int, _Record], copies: int, batch: int, ref: _Pass):  # noqa: ANN202
        cfg = self.config
        handles: list[RemovableHandle] = []
        stepwise = []
        reused: list[nn.Module] = []
        try:
            if cfg.inject == "logit" and len(idx) == 1 and idx[0] in ref.layer_outputs:
                # Layer-wise: the layer's output before noise is the same for every copy, so skip its
                # computation and stack the clean output (the copies' cost is then only what follows).
                layer, out = self.layers[idx[0]], ref.layer_outputs[idx[0]]
                stacked = out if layer.shared else repeat_copies(out, copies)
                layer.module.forward = lambda *args, **kwargs: stacked  # type: ignore[method-assign]
                reused.append(layer.module)
            for i in idx:
                layer, rec = self.layers[i], records[i]
                if cfg.inject == "weight":
                    handles.append(layer.module.register_forward_hook(_weight_noise(layer, rec, copies, cfg)))
                elif layer.stepwise:
                    mod: Any = layer.module
                    mod.noise_sigma = layer.sigma
                    mod.step_noise = _step_noise(copies, cfg)
                    stepwise.append(mod)
                else:
                    handles.append(layer.module.register_forward_hook(_logit_noise(layer, rec, copies, cfg, batch)))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for mod in stepwise:
                mod.step_noise = None
            for module in reused:
                del module.forward

    # -- estimates ------------------------------------------------------------------------------
    def _accumulate(self, i: int, acc: _Accum, rec: _Record, w: torch.Tensor, ref: _Pass) -> None:
        layer = self.layers[i]
        copies, batch = w.shape
        if self.config.inject == "weight" or layer.shared:
            # One draw per copy shared by the batch: weight by the copy's mean loss.
            wc = w.mean(1)
            if self.config.inject == "weight":
                for name, eps in rec.weight_eps.items():
                    term = torch.tensordot(wc, eps, dims=1)
                    acc.add(name, term)
                if self.config.adaptive_sigma:
                    chi = sum(((e**2 - 1).flatten(1).sum(1) for e in rec.weight_eps.values()), torch.zeros_like(wc))
                    acc.log_sigma += float((wc * chi).sum())
            else:
                eps = rec.eps[0]  # (copies, *out)
                acc.add_g(torch.tensordot(wc, eps, dims=1))
                if self.config.adaptive_sigma:
                    acc.log_sigma += float((wc * (eps**2 - 1).flatten(1).sum(1)).sum())
                acc.input = rec.inputs[0] if rec.inputs else ref.layer_inputs[i]
            return
        if layer.stepwise:
            mod: Any = layer.module
            g, ls = mod.noise_grads(w.reshape(-1))
            mod.clear_noise()
            for name, t in g.items():
                acc.add(name, t)
            acc.log_sigma += float(ls)
            return
        eps = rec.eps[0]  # (copies, batch, *per-sample noise)
        wb = w.view(copies, batch, *([1] * (eps.dim() - 2)))
        if self.config.adaptive_sigma:
            # ∂E[L]/∂log σ = E[(L - b)(ε² - 1)] summed over the noise dimensions.
            acc.log_sigma += float((w * (eps**2 - 1).flatten(2).sum(2)).sum())
        if rec.inputs:
            # Noise upstream (all layers at once): each copy has its own input, contract per row.
            g = (wb * eps).reshape(-1, *rec.out_tail)
            for name, t in local_grads(layer.module, rec.inputs[0], g).items():
                acc.add(name, t)
        else:
            # Layer-wise: every copy saw the same clean input, so sum the noise over copies first and
            # contract once with the clean input (copies-times cheaper).
            acc.add_g((wb * eps).sum(0).reshape(-1, *rec.out_tail))

    def _finish(self, i: int, acc: _Accum, copies: int, batch: int, ref: _Pass, grads: dict[int, torch.Tensor]) -> None:
        layer, st = self.layers[i], self.state[i]
        # Per-sample noise averages over copies and the batch (the loss is a batch mean); noise shared
        # by the batch (weight noise, graph layers) was weighted by the copy's mean loss already.
        scale = 1.0 / copies if (layer.shared or self.config.inject == "weight") else 1.0 / (copies * batch)
        factor = scale / layer.sigma
        if acc.g is not None:
            x = acc.input if acc.input is not None else ref.layer_inputs[i]
            for name, t in local_grads(layer.module, x, acc.g * factor).items():
                acc.add(name, t, prescaled=True)
        for name, p in layer.params():
            total = acc.sums[name] * factor if name in acc.sums else None
            if name in acc.prescaled:
                total = acc.prescaled[name] if total is None else total + acc.prescaled[name]
            if total is not None:
                grads[id(p)] = grads[id(p)] + total if id(p) in grads else total
        if self.config.adaptive_sigma:
            g = acc.log_sigma * scale
            st.grad_sq = 0.9 * st.grad_sq + 0.1 * g * g
            st.log_sigma -= self.config.sigma_lr * g / (math.sqrt(st.grad_sq) + 1e-12)
            st.log_sigma = min(max(st.log_sigma, st.log_sigma0 - math.log(100.0)), st.log_sigma0 + math.log(10.0))
            layer.sigma = math.exp(st.log_sigma)

    # -- modes ----------------------------------------------------------------------------------
    def _set_eval(self) -> list[tuple[nn.Module, bool]]:
        modes = [(m, m.training) for b in self.blocks for m in b.modules()]
        for b in self.blocks:
            b.eval()
        return modes

    @staticmethod
    def _restore(modes: list[tuple[nn.Module, bool]]) -> None:
        for m, training in modes:
            m.training = training


class _Record:
    """What the noise hooks of one chunk saw."""

    def __init__(self) -> None:
        self.eps: list[torch.Tensor] = []
        self.inputs: list[torch.Tensor] = []
        self.weight_eps: dict[str, torch.Tensor] = {}
        self.out_tail: tuple[int, ...] = ()
        """The layer output's shape without its rows (a sample may own several rows, e.g. time steps)."""


class _Accum:
    """Running sums of one layer's estimate over chunks."""

    def __init__(self) -> None:
        self.g: torch.Tensor | None = None
        self.input: torch.Tensor | None = None
        self.sums: dict[str, torch.Tensor] = {}
        self.prescaled: dict[str, torch.Tensor] = {}
        self.log_sigma = 0.0

    def add_g(self, g: torch.Tensor) -> None:
        self.g = g if self.g is None else self.g + g

    def add(self, name: str, t: torch.Tensor, *, prescaled: bool = False) -> None:
        target = self.prescaled if prescaled else self.sums
        target[name] = t if name not in target else target[name] + t


def _capture_output(store: dict[int, torch.Tensor], i: int):  # noqa: ANN202
    def hook(module: nn.Module, inputs: tuple[Any, ...], out: Any) -> None:
        if isinstance(out, torch.Tensor):
            store[i] = out.detach()

    return hook


def _capture(store: dict[int, torch.Tensor], i: int):  # noqa: ANN202
    def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
        store[i] = inputs[0].detach()

    return hook


def _logit_noise(  # noqa: ANN202
    layer: NoisyLayer, rec: _Record, copies: int, cfg: LikelihoodRatioConfig, batch: int
):
    antithetic = cfg.baseline == "antithetic"

    def hook(module: nn.Module, inputs: tuple[Any, ...], out: Any) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise ConfigError(
                f"ulr cannot add noise to {layer.name} ({type(module).__name__}): its output is not a tensor; "
                "use gradkit's Recurrent layer or the hybrid mode (--stages K)"
            )
        if layer.shared:
            eps = draw_noise(copies, 1, tuple(out.shape), sampler=cfg.sampler, antithetic=antithetic,
                             device=out.device).squeeze(1)
            rec.eps.append(eps)
            return out.unsqueeze(0) + layer.sigma * eps
        rows = out.shape[0]
        if rows % (copies * batch):
            # A layer applied per time step (N*T rows) is fine; anything else mixes samples.
            raise ConfigError(
                f"ulr: {layer.name} ({type(module).__name__}) output has {rows} rows, not a multiple of "
                f"{copies}x{batch}; layers that mix samples need the hybrid mode (--stages K)"
            )
        per_sample = rows // (copies * batch)
        shape = (per_sample, *out.shape[1:]) if per_sample > 1 else tuple(out.shape[1:])
        eps = draw_noise(copies, batch, shape, sampler=cfg.sampler, antithetic=antithetic, device=out.device)
        rec.eps.append(eps)
        rec.out_tail = tuple(out.shape[1:])
        if not cfg.layerwise:
            rec.inputs.append(inputs[0].detach())
        return out + layer.sigma * eps.reshape(out.shape)

    return hook


def _step_noise(copies: int, cfg: LikelihoodRatioConfig):  # noqa: ANN202
    antithetic = cfg.baseline == "antithetic"

    def noise(shape: tuple[int, ...]) -> torch.Tensor:
        rows = shape[0]
        eps = draw_noise(copies, rows // copies, tuple(shape[1:]), sampler=cfg.sampler, antithetic=antithetic)
        return eps.reshape(shape)

    return noise


def _weight_noise(  # noqa: ANN202
    layer: NoisyLayer, rec: _Record, copies: int, cfg: LikelihoodRatioConfig
):
    from torch.func import functional_call, vmap

    antithetic = cfg.baseline == "antithetic"
    busy = [False]

    def hook(module: nn.Module, inputs: tuple[Any, ...], out: Any) -> torch.Tensor | None:
        if busy[0]:  # the functional call below runs this module (and so this hook) again
            return None
        busy[0] = True
        try:
            return _perturbed(module, inputs[0])
        finally:
            busy[0] = False

    def _perturbed(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        params = dict(layer.params())
        noisy = {}
        for name, p in params.items():
            eps = draw_noise(copies, 1, tuple(p.shape), sampler=cfg.sampler, antithetic=antithetic,
                             device=p.device).squeeze(1)
            rec.weight_eps[name] = eps
            noisy[name] = p.detach().unsqueeze(0) + layer.sigma * eps

        def call(prm: dict[str, torch.Tensor], xx: torch.Tensor) -> torch.Tensor:
            return functional_call(module, prm, (xx,))

        if layer.shared:
            return vmap(call, in_dims=(0, None))(noisy, x)
        xs = x.reshape(copies, x.shape[0] // copies, *x.shape[1:])
        res = vmap(call)(noisy, xs)
        return res.reshape(copies * res.shape[1], *res.shape[2:])

    return hook
