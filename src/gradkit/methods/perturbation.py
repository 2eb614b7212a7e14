"""Weight-perturbation peers of ULR: ``spsa`` (two-point, MeZO-style) and ``es`` (evolution strategies).

Both perturb every weight at once and estimate the gradient from loss differences alone, as ULR does,
but in the full parameter space rather than per layer output; they are here to compare with
(Jiang et al., ICLR 2024, discuss both). Each direction costs two forward passes.

* SPSA (Spall, 1992; MeZO, Malladi et al., 2023): ``g = Σ_k (L(w + εz_k) - L(w - εz_k)) / (2ε) · z_k / K``
  with Gaussian ``z``.
* ES (Salimans et al., 2017): antithetic Gaussian population, centred-rank-normalised returns,
  ``d = Σ_i r_i z_i``. Ranks carry no scale, so ``d`` is rescaled to the norm of the two-point estimate
  from the same evaluations: with plain SGD the raw ``d / σ`` steps are orders of magnitude too large.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gradkit.errors import ConfigError
from gradkit.methods._base import LossFn
from gradkit.methods._directional import DirectionalEstimator, eval_mode_after_clean_pass
from gradkit.methods._registry import METHODS
from gradkit.optim import OptimizerFactory

__all__ = ["SPSA", "EvolutionStrategies"]


class _Perturbation(DirectionalEstimator):
    """Common loop: draw directions, evaluate ``L(w ± σz)``, fill ``.grad``, step."""

    def __init__(
        self,
        stages: Sequence[nn.Module],
        *,
        loss_fn: LossFn | None,
        optimizer: OptimizerFactory | None,
        directions: int,
        sigma: float,
    ) -> None:
        super().__init__(stages, loss_fn=loss_fn, optimizer=optimizer, directions=directions)
        if not (isinstance(sigma, int | float) and sigma > 0):
            raise ConfigError(f"{self.name} option sigma must be > 0, got {sigma!r}")
        self.sigma = float(sigma)

    @property
    def forward_passes(self) -> int:
        """Forward passes of the batch per step, besides the clean one."""
        return 2 * self.directions

    @torch.no_grad()
    def _loss_at(self, z: list[torch.Tensor], scale: float, x: torch.Tensor, y: torch.Tensor) -> float:
        for p, d in zip(self._params, z, strict=True):
            p.add_(d, alpha=scale)
        try:
            return self.loss_fn(self.forward(x), y).item()
        finally:
            for p, d in zip(self._params, z, strict=True):
                p.sub_(d, alpha=scale)

    def _pairs(self, x: torch.Tensor, y: torch.Tensor) -> list[tuple[list[torch.Tensor], float, float]]:
        out = []
        for _ in range(self.directions):
            z = [torch.randn_like(p) for p in self._params]
            out.append((z, self._loss_at(z, self.sigma, x, y), self._loss_at(z, -self.sigma, x, y)))
        return out

    def estimate(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Fill ``.grad`` with the estimate without stepping; returns the clean loss."""
        with eval_mode_after_clean_pass(self, x, y) as loss:
            grads = self._estimate(self._pairs(x, y))
        for p, g in zip(self._params, grads, strict=True):
            p.grad = g
        return loss

    def _estimate(self, pairs: list[tuple[list[torch.Tensor], float, float]]) -> list[torch.Tensor]:
        raise NotImplementedError


@METHODS.register("spsa", help="two-point random perturbation of all weights (SPSA/MeZO); a ULR peer")
class SPSA(_Perturbation):
    """SPSA / MeZO two-point gradient estimate over all weights at once.

    Options: ``directions`` (default 1; 2 forward passes each), ``sigma`` (default 1e-3).
    """

    name = "spsa"

    def __init__(
        self,
        stages: Sequence[nn.Module],
        *,
        loss_fn: LossFn | None = None,
        optimizer: OptimizerFactory | None = None,
        directions: int = 1,
        sigma: float = 1e-3,
    ) -> None:
        super().__init__(stages, loss_fn=loss_fn, optimizer=optimizer, directions=directions, sigma=sigma)

    def _estimate(self, pairs: list[tuple[list[torch.Tensor], float, float]]) -> list[torch.Tensor]:
        grads = [torch.zeros_like(p) for p in self._params]
        for z, plus, minus in pairs:
            coef = (plus - minus) / (2 * self.sigma * len(pairs))
            for g, d in zip(grads, z, strict=True):
                g.add_(d, alpha=coef)
        return grads


@METHODS.register("es", help="evolution strategies: antithetic population, rank-normalised; a ULR peer")
class EvolutionStrategies(_Perturbation):
    """OpenAI-style ES (Salimans et al., 2017) with antithetic pairs and centred ranks.

    Options: ``directions`` (antithetic pairs, default 8), ``sigma`` (default 1e-2).
    """

    name = "es"

    def __init__(
        self,
        stages: Sequence[nn.Module],
        *,
        loss_fn: LossFn | None = None,
        optimizer: OptimizerFactory | None = None,
        directions: int = 8,
        sigma: float = 1e-2,
    ) -> None:
        super().__init__(stages, loss_fn=loss_fn, optimizer=optimizer, directions=directions, sigma=sigma)

    def _estimate(self, pairs: list[tuple[list[torch.Tensor], float, float]]) -> list[torch.Tensor]:
        losses = torch.tensor([v for _, plus, minus in pairs for v in (plus, minus)])
        # Centred ranks in [-0.5, 0.5]: invariant to the loss's scale, robust to outliers.
        ranks = torch.empty_like(losses)
        ranks[losses.argsort()] = torch.arange(len(losses), dtype=losses.dtype)
        ranks = ranks / max(len(losses) - 1, 1) - 0.5
        grads = [torch.zeros_like(p) for p in self._params]
        two_point = [torch.zeros_like(p) for p in self._params]
        for k, (z, plus, minus) in enumerate(pairs):
            coef = float(ranks[2 * k] - ranks[2 * k + 1])
            spsa = (plus - minus) / (2 * self.sigma * len(pairs))
            for g, t, d in zip(grads, two_point, z, strict=True):
                g.add_(d, alpha=coef)
                t.add_(d, alpha=spsa)
        norm = torch.stack([(g * g).sum() for g in grads]).sum().sqrt()
        target = torch.stack([(t * t).sum() for t in two_point]).sum().sqrt()
        factor = float(target / norm) if float(norm) > 0 else 0.0
        return [g.mul_(factor) for g in grads]
