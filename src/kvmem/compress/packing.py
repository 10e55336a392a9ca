"""Bit packing: integer codes of 1 to 8 bits stored densely in ``uint8`` (no wasted bits).

Widths that divide 8 (1, 2, 4, 8) put ``8 // bits`` codes in each byte. Other widths (3, 5, 6, 7)
pack eight codes into ``bits`` bytes: the eight codes form one little-endian word of ``8 * bits``
bits, code ``i`` in bits ``[i * bits, (i + 1) * bits)``.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def _check(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def packed_size(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take."""
    _check(bits)
    if 8 % bits == 0:
        return -(-n // (8 // bits))
    return -(-n // 8) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ([..., n], integer values in [0, 2**bits)) into uint8 [..., packed_size(n, bits)].

    For widths that divide 8, code ``i`` of a byte sits in bits ``[i * bits, (i + 1) * bits)``.
    """
    _check(bits)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing")
    n = codes.shape[-1]
    if 8 % bits == 0:
        per_byte = 8 // bits
        codes = codes.to(torch.uint8)
        pad = packed_size(n, bits) * per_byte - n
        if pad:
            codes = torch.nn.functional.pad(codes, (0, pad))
        grouped = codes.reshape(*codes.shape[:-1], -1, per_byte)  # [..., bytes, per_byte]
        shifts = torch.arange(per_byte, dtype=torch.uint8, device=codes.device) * bits
        return (grouped << shifts).sum(dim=-1, dtype=torch.uint8)  # disjoint bits: sum == bitwise or
    codes = codes.to(torch.int64)
    pad = -n % 8
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    grouped = codes.reshape(*codes.shape[:-1], -1, 8)  # [..., words, 8]
    shifts = torch.arange(8, dtype=torch.int64, device=codes.device) * bits
    words = (grouped << shifts).sum(dim=-1, keepdim=True)  # [..., words, 1], 8 * bits bits each
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=codes.device) * 8
    out = ((words >> byte_shifts) & 0xFF).to(torch.uint8)  # [..., words, bits]
    return out.reshape(*codes.shape[:-1], -1)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack``: uint8 [..., bytes] -> uint8 codes [..., n]."""
    _check(bits)
    if packed.dtype != torch.uint8:
        raise ValueError("packed codes must be uint8")
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, dtype=torch.uint8, device=packed.device) * bits
        codes = (packed.unsqueeze(-1) >> shifts) & mask  # [..., bytes, per_byte]
        return codes.reshape(*packed.shape[:-1], -1)[..., :n]
    grouped = packed.reshape(*packed.shape[:-1], -1, bits).to(torch.int64)  # [..., words, bits]
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    words = (grouped << byte_shifts).sum(dim=-1, keepdim=True)  # [..., words, 1]
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * bits
    codes = ((words >> shifts) & mask).to(torch.uint8)  # [..., words, 8]
    return codes.reshape(*packed.shape[:-1], -1)[..., :n]
