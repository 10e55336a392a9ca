"""Seeded orthogonal rotations per KV head, to spread outlier channels before low-bit codes.

QuaRot / RotateKV / TurboQuant rotate each head's vectors by a fixed orthogonal matrix before
quantizing: a few large channels are spread over all of them, so every coordinate looks alike
(close to Gaussian for a random rotation) and a per-vector scale fits them all. Here each head
``h`` gets ``M_h = diag(s_h) @ H / sqrt(D)``: a Sylvester Hadamard matrix with seeded random signs
``s_h`` per head, when ``D`` is a power of two; otherwise a seeded random orthogonal matrix (the Q
of a Gaussian matrix's QR). Row vectors rotate as ``x @ M_h`` and back as ``y @ M_h.T``.

The matrices are a pure function of (seed, heads, head_dim): nothing is stored per block, and a
block saved, shared or swapped decodes with the same rotation wherever the same format is named.
"""

from __future__ import annotations

import functools
import math

import torch


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=64)
def _rotations(seed: int, heads: int, head_dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if head_dim & (head_dim - 1) == 0:
        signs = torch.randint(0, 2, (heads, head_dim, 1), generator=g).float() * 2 - 1  # [H, D, 1]
        return signs * _hadamard(head_dim) / math.sqrt(head_dim)  # [H, D, D]
    gauss = torch.randn(heads, head_dim, head_dim, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # unique: diag(r) > 0
    return q.float()


def rotations(seed: int, heads: int, head_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The orthogonal matrices of every head: float32 [H, D, D], ``M_h @ M_h.T == I``."""
    return _rotations(seed, heads, head_dim).to(device)


def rotate(x: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """x [..., H, T, D] -> x @ M_h per head, float32 [..., H, T, D]."""
    return torch.matmul(x.float(), matrices)


def unrotate(y: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Inverse of ``rotate``: y [..., H, T, D] -> y @ M_h.T, float32."""
    return torch.matmul(y, matrices.transpose(-1, -2))
