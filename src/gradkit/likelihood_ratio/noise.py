"""Noise for likelihood-ratio estimates: plain normal or quasi-Monte Carlo, optionally antithetic.

Jiang et al. (ICLR 2024) reduce the variance of the estimate with quasi-Monte Carlo noise and
antithetic pairs. QMC here is scrambled Sobol through the inverse normal CDF (``torch.special.ndtri``):
unscrambled Sobol with Box-Muller is degenerate (a bug seen in public code), and scrambling keeps every
draw exactly N(0, 1)-distributed, so the estimate stays unbiased.
"""

from __future__ import annotations

import logging

import torch

from gradkit.errors import ConfigError

__all__ = ["SAMPLERS", "draw_noise"]

log = logging.getLogger(__name__)

SAMPLERS = ("normal", "qmc")

# SobolEngine supports at most this many dimensions; wider outputs fall back to plain normal noise.
_SOBOL_MAX_DIM = 21201
_warned: set[int] = set()


def draw_noise(
    copies: int,
    batch: int,
    shape: tuple[int, ...],
    *,
    sampler: str = "normal",
    antithetic: bool = False,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard-normal noise of shape ``(copies, batch, *shape)``, copy-major.

    Args:
        copies: noisy copies of each sample.
        batch: samples (1 for a layer whose output is shared by the batch, e.g. a graph convolution).
        shape: noise dimensions of one sample.
        sampler: ``normal`` (i.i.d.) or ``qmc`` (scrambled Sobol; each sample gets ``copies``
            consecutive points, a balanced net when ``copies`` is a power of two).
        antithetic: the second half of the copies is the negated first half (needs even ``copies``).
        device: where the noise is made.

    Randomness comes from torch's global generator (also the Sobol scramble seeds), so a run that
    restores the RNG state draws the same noise.
    """
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown noise sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    if antithetic and copies % 2:
        raise ConfigError(f"antithetic noise needs an even number of copies, got {copies}")
    drawn = copies // 2 if antithetic else copies
    dim = 1
    for d in shape:
        dim *= int(d)
    if sampler == "qmc" and dim <= _SOBOL_MAX_DIM:
        eps = _sobol_normal(drawn, batch, dim).to(device)
    else:
        if sampler == "qmc" and dim not in _warned:
            _warned.add(dim)
            log.warning("qmc noise: %d dimensions exceed Sobol's %d; using normal noise there", dim, _SOBOL_MAX_DIM)
        eps = torch.randn(drawn, batch, dim, device=device)
    if antithetic:
        eps = torch.cat([eps, -eps], dim=0)
    return eps.reshape(copies, batch, *shape)


def _sobol_normal(copies: int, batch: int, dim: int) -> torch.Tensor:
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    engine = torch.quasirandom.SobolEngine(dim, scramble=True, seed=seed)
    # Sample-major: sample n takes points [n*copies, (n+1)*copies), so its copies form a net.
    u = engine.draw(copies * batch, dtype=torch.float64)
    # ndtri(0) is -inf; scrambled points are almost never 0, but clamp to be safe.
    u = u.clamp_(1e-7, 1 - 1e-7)
    z = torch.special.ndtri(u).to(torch.float32)
    return z.reshape(batch, copies, dim).transpose(0, 1).contiguous()
