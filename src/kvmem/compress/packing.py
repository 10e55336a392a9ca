"""Bit packing: integer codes of 2, 4 or 8 bits stored densely in ``uint8`` (no wasted bits)."""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 4, 8)


def _check(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return 8 // bits  # codes per byte


def packed_size(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take."""
    per_byte = _check(bits)
    return -(-n // per_byte)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ([..., n], integer values in [0, 2**bits)) into uint8 [..., ceil(n * bits / 8)].

    Code ``i`` of a byte sits in bits ``[i * bits, (i + 1) * bits)`` (little-endian within the byte).
    """
    per_byte = _check(bits)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing")
    codes = codes.to(torch.uint8)
    n = codes.shape[-1]
    pad = packed_size(n, bits) * per_byte - n
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    grouped = codes.reshape(*codes.shape[:-1], -1, per_byte)  # [..., bytes, per_byte]
    shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
    return (grouped << shifts).sum(dim=-1, dtype=torch.uint8)  # disjoint bits: sum == bitwise or


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack``: uint8 [..., bytes] -> uint8 codes [..., n]."""
    per_byte = _check(bits)
    if packed.dtype != torch.uint8:
        raise ValueError("packed codes must be uint8")
    shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
    mask = (1 << bits) - 1
    codes = (packed.unsqueeze(-1) >> shifts) & mask  # [..., bytes, per_byte]
    return codes.reshape(*packed.shape[:-1], -1)[..., :n]
