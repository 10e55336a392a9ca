"""Scalar codebooks for coordinates that are close to Gaussian (as they are after a random rotation).

``lloyd_max(bits)``: the Lloyd-Max quantizer of the standard normal, the ``2**bits`` levels that
minimise the mean squared error (TurboQuant's per-coordinate codebook). ``uniform(bits)``: evenly
spaced levels, the step chosen for the least squared error on the standard normal. Both are
computed once from the normal's density (Lloyd's iteration; a golden-section search on the step),
so no table is copied from elsewhere. Levels are sorted; a code is the index of its level.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch


def _pdf(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _centroid(a: float, b: float) -> float:
    """E[X | a < X < b] for X ~ N(0, 1)."""
    mass = _cdf(b) - _cdf(a)
    return (_pdf(a) - _pdf(b)) / mass if mass > 0 else 0.5 * (a + b)


def _mse(levels: list[float]) -> float:
    """E[(X - q(X))^2] for X ~ N(0, 1) and nearest-level q, in closed form per cell."""
    edges = [-math.inf, *((x + y) / 2 for x, y in itertools.pairwise(levels)), math.inf]
    total = 0.0
    for c, a, b in zip(levels, edges, edges[1:]):
        pa, pb = (_pdf(a) if math.isfinite(a) else 0.0), (_pdf(b) if math.isfinite(b) else 0.0)
        fa, fb = (a * pa if math.isfinite(a) else 0.0), (b * pb if math.isfinite(b) else 0.0)
        mass = _cdf(b) - _cdf(a)
        second = mass + fa - fb  # E[X^2; a<X<b]
        first = pa - pb  # E[X; a<X<b]
        total += second - 2 * c * first + c * c * mass
    return total


@functools.lru_cache(maxsize=16)
def _lloyd_max(bits: int) -> tuple[float, ...]:
    n = 1 << bits
    levels = [(i + 0.5 - n / 2) * 4 / n for i in range(n)]
    for _ in range(500):
        edges = [-math.inf, *((x + y) / 2 for x, y in itertools.pairwise(levels)), math.inf]
        levels = [_centroid(a, b) for a, b in itertools.pairwise(edges)]
    return tuple(levels)


@functools.lru_cache(maxsize=16)
def _uniform(bits: int) -> tuple[float, ...]:
    n = 1 << bits

    def grid(step: float) -> list[float]:
        return [(i + 0.5 - n / 2) * step for i in range(n)]

    lo, hi = 1e-3, 4.0
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(100):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if _mse(grid(a)) < _mse(grid(b)):
            hi = b
        else:
            lo = a
    return tuple(grid((lo + hi) / 2))


def lloyd_max(bits: int) -> torch.Tensor:
    """float32 [2**bits] sorted levels of the Lloyd-Max quantizer of N(0, 1)."""
    return torch.tensor(_lloyd_max(bits), dtype=torch.float32)


def uniform(bits: int) -> torch.Tensor:
    """float32 [2**bits] evenly spaced levels, step optimal for N(0, 1)."""
    return torch.tensor(_uniform(bits), dtype=torch.float32)


def gaussian_mse(levels: torch.Tensor) -> float:
    """The codebook's mean squared error on N(0, 1) (nearest level)."""
    return _mse([float(x) for x in levels])


def nearest(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level for each element of ``x`` (uint8, same shape)."""
    edges = (levels[1:] + levels[:-1]) / 2  # [L-1], sorted
    return torch.bucketize(x.contiguous(), edges.to(x.device)).to(torch.uint8)
