"""Finding the layers a likelihood-ratio estimate covers, and each layer's local estimator.

With noise ``z = σε`` on a layer's output ``y = f(x; W)``, Jiang et al. (ICLR 2024) estimate
``∇_W E[L] = E[L · J_W(x)ᵀ ε] / σ``: only the Jacobian of that one layer is needed. Given the
copy-weighted noise ``G = Σ (L - b) ε / σ`` (already divided by copies and batch), every estimator here
returns ``J_W(x)ᵀ G``:

* Linear: ``Gᵀ x`` (any leading dims: time steps of a spiking layer contract like the batch);
* Conv2d: exactly ``torch.nn.grad.conv2d_weight(x, W.shape, G)`` (stride, padding, dilation, groups);
* BatchNorm (eval mode, running statistics): ``Σ G · x̂`` for γ and ``Σ G`` for β;
* anything else: a local vector-Jacobian product through that module alone (autograd on one layer, never
  through the network), which is the general "surrogate" form of the estimator.

Layers that inject their own noise per step (recurrent cells, see :class:`StepNoiseLayer`) compute their
estimate from what they recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.nn.grad import conv2d_weight

from gradkit.errors import ConfigError

__all__ = ["NoisyLayer", "StepNoiseLayer", "find_layers", "local_grads", "flat_blocks"]

Grads = dict[str, torch.Tensor]


@runtime_checkable
class StepNoiseLayer(Protocol):
    """A layer that adds noise inside its own forward (e.g. at every time step of a recurrence).

    The engine sets ``step_noise`` to a function ``(shape) -> ε`` (standard normal, for the rows of the
    current forward) and ``noise_sigma``; the layer adds ``σ·ε`` where the noise belongs, records what
    its estimator needs, and :meth:`noise_grads` returns ``Σ_rows coef · J_Wᵀ ε`` for per-row
    coefficients ``coef = L - b`` (the engine divides by σ, copies and batch).
    """

    step_noise: Callable[[tuple[int, ...]], torch.Tensor] | None
    noise_sigma: float

    def noise_grads(self, coef: torch.Tensor) -> tuple[Grads, torch.Tensor]:
        """Unscaled sums by parameter name, and ``Σ coef·(ε² - 1)`` (for the log-σ gradient)."""
        ...

    def clear_noise(self) -> None:
        """Forget recorded steps and stop injecting noise."""
        ...


@dataclass
class NoisyLayer:
    """One layer with its own noise: where it sits and how much noise and how many copies it gets."""

    name: str
    module: nn.Module
    block: int
    """Index of the top-level block (across stages) that holds it."""
    sigma: float
    copies: int
    shared: bool = False
    """Its output does not have a batch dimension (it is shared by every sample, e.g. graph conv)."""

    @property
    def stepwise(self) -> bool:
        return isinstance(self.module, StepNoiseLayer)

    def params(self) -> Iterator[tuple[str, nn.Parameter]]:
        recurse = self.stepwise
        for name, p in self.module.named_parameters(recurse=recurse):
            if p.requires_grad:
                yield name, p


def flat_blocks(stages: Sequence[nn.Module]) -> tuple[list[nn.Module], list[str], list[int]]:
    """Top-level blocks of all stages in order, their names, and the stage each belongs to."""
    blocks, names, owner = [], [], []
    for s, stage in enumerate(stages):
        # Not named_children(): it lists a block used twice (at two positions) once, and these blocks
        # are run in order, as nn.Sequential runs them.
        children = ([(n, m) for n, m in stage._modules.items() if m is not None]
                    if isinstance(stage, nn.Sequential) else [(f"stage{s}", stage)])
        for name, block in children:
            blocks.append(block)
            names.append(name)
            owner.append(s)
    return blocks, names, owner


def find_layers(stages: Sequence[nn.Module]) -> list[NoisyLayer]:
    """Every module that owns trainable parameters, in forward order, as a :class:`NoisyLayer`.

    σ and copies are placeholders here; the engine assigns them. A parameter that two modules own (a
    tied weight) appears in both layers, one per use.

    Raises:
        ConfigError: one module is registered at two places (a shared block): its uses cannot get
            separate noise.
    """
    blocks, names, _ = flat_blocks(stages)
    layers: list[NoisyLayer] = []
    seen: dict[int, str] = {}
    for k, (block, bname) in enumerate(zip(blocks, names, strict=True)):
        skip_under: list[str] = []
        for mname, module in block.named_modules(remove_duplicate=False):
            if any(mname.startswith(prefix + ".") for prefix in skip_under):
                continue
            full = f"{bname}.{mname}" if mname else bname
            if isinstance(module, StepNoiseLayer):
                skip_under.append(mname)
                owned = [p for p in block.get_submodule(mname).parameters() if p.requires_grad]
            else:
                owned = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not owned:
                continue
            if id(module) in seen:
                # Its noise hook would fire at every use at once, and its clean output is captured
                # once: the uses cannot be told apart.
                raise ConfigError(
                    f"ulr puts noise on each layer's output, but {full} is the same module as "
                    f"{seen[id(module)]} (used twice); use the hybrid mode (--stages K >= 2), whose "
                    "stages backpropagate inside themselves, or give each use its own module"
                )
            seen[id(module)] = full
            # A parameter of two modules (a tied embedding and output head) is a layer at each use:
            # the engine adds the estimates of both uses.
            shared = bool(getattr(module, "output_shared_by_batch", False))
            layers.append(NoisyLayer(full, module, k, sigma=0.0, copies=0, shared=shared))
    return layers


def local_grads(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Grads:
    """``J_W(x)ᵀ g`` for the module's own trainable parameters (no recursion into children)."""
    if type(module) is nn.Linear or getattr(module, "estimate_as_linear", False):
        return _linear(module, x, g)  # type: ignore[arg-type]
    if type(module) is nn.Conv2d and module.padding_mode == "zeros":
        return _conv2d(module, x, g)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.training:
        return _batchnorm(module, x, g)
    return _vjp(module, x, g)


def _linear(m: nn.Linear, x: torch.Tensor, g: torch.Tensor) -> Grads:
    g2 = g.reshape(-1, m.out_features)
    out = {"weight": g2.t() @ x.reshape(-1, m.in_features)}
    if m.bias is not None:
        out["bias"] = g2.sum(0)
    return out


def _conv2d(m: nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> Grads:
    # conv2d_weight contracts with dilation=stride internally; a hand-rolled conv with stride=stride
    # instead is wrong for stride 2 (a bug seen in public ULR code).
    out = {
        "weight": conv2d_weight(
            x, m.weight.shape, g, stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups
        )
    }
    if m.bias is not None:
        out["bias"] = g.sum(dim=(0, 2, 3))
    return out


def _batchnorm(m: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, g: torch.Tensor) -> Grads:
    if not m.affine:
        return {}
    shape = (1, -1) + (1,) * (x.dim() - 2)
    assert m.running_mean is not None and m.running_var is not None
    xhat = (x - m.running_mean.reshape(shape)) * torch.rsqrt(m.running_var.reshape(shape) + m.eps)
    dims = [d for d in range(g.dim()) if d != 1]
    return {"weight": (g * xhat).sum(dims), "bias": g.sum(dims)}


def _vjp(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Grads:
    named = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    with torch.enable_grad():
        out = module(x)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{type(module).__name__} returns {type(out).__name__}, not a tensor")
        grads = torch.autograd.grad(out, [p for _, p in named], g, allow_unused=True)
    return {n: (gr if gr is not None else torch.zeros_like(p)) for (n, p), gr in zip(named, grads, strict=True)}
