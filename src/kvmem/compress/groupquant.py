"""Asymmetric min-max quantization in groups, stored packed: the arithmetic under KIVI and friends.

Groups are ``group_size`` consecutive elements along one dimension; each group keeps a scale and
a zero point (float16 by default, float32 when the data leaves float16's range) and ``bits``-bit
codes packed into ``uint8``. ``QuantizedTensor.nbytes`` counts all three: the bytes really held.

KIVI quantizes keys per channel (groups run along the token axis) and values per token (groups
run along the channel axis): ``quantize(keys, 2, 32, dim=-2)`` and ``quantize(values, 2, 32, dim=-1)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmem.compress.packing import pack, unpack

_FP16_MAX = 65504.0


@dataclass(frozen=True)
class QuantizedTensor:
    packed: torch.Tensor  # uint8 [..., groups, packed bytes per group]
    scale: torch.Tensor  # [..., groups, 1]
    zero: torch.Tensor  # [..., groups, 1]
    bits: int
    group_size: int
    dim: int
    shape: tuple[int, ...]  # the original shape
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes plus scales and zero points."""
        return self.packed.nbytes + self.scale.nbytes + self.zero.nbytes


def _round_down(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = x.to(dtype)
    return torch.where(y.float() > x, torch.nextafter(y, torch.tensor(-torch.inf, dtype=dtype)), y)


def _round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = x.to(dtype)
    return torch.where(y.float() < x, torch.nextafter(y, torch.tensor(torch.inf, dtype=dtype)), y)


def quantize(x: torch.Tensor, bits: int, group_size: int, dim: int = -1) -> QuantizedTensor:
    """Quantize ``x`` to ``bits`` bits in groups of ``group_size`` along ``dim``.

    Every element's dequantization error is at most half its group's scale,
    ``(max - min) / (2**bits - 1) / 2`` (the stored scale is rounded up, never down).
    """
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    dim = dim % x.dim()
    moved = x.movedim(dim, -1).float()  # [..., n]
    n = moved.shape[-1]
    pad = -n % group_size
    if pad:  # repeat the last element: padding never widens a group's range
        moved = torch.cat([moved, moved[..., -1:].expand(*moved.shape[:-1], pad)], dim=-1)
    groups = moved.reshape(*moved.shape[:-1], -1, group_size)  # [..., groups, G]
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    peak = float(moved.abs().max()) if moved.numel() else 0.0
    stats_dtype = torch.float16 if peak < _FP16_MAX / 2 else torch.float32
    levels = (1 << bits) - 1
    zero = _round_down(low, stats_dtype)
    scale = _round_up((high - zero.float()) / levels, stats_dtype)
    divisor = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    codes = torch.clamp(torch.round((groups - zero.float()) / divisor), 0, levels)
    return QuantizedTensor(pack(codes, bits), scale, zero, bits, group_size, dim, tuple(x.shape), x.dtype)


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """Back to a dense tensor of the original shape and dtype."""
    codes = unpack(q.packed, q.bits, q.group_size).float()  # [..., groups, G]
    values = codes * q.scale.float() + q.zero.float()
    n = q.shape[q.dim]
    flat = values.reshape(*values.shape[:-2], -1)[..., :n]  # [..., n]
    return flat.movedim(-1, q.dim).to(q.dtype)
