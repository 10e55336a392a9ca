"""Rotated low-bit KV (TurboQuant-style): a seeded rotation per head, a scale per vector, Gaussian codes.

After a random orthogonal rotation (``kvmem.compress.rotation``) the coordinates of a head's vector
are spread evenly and close to Gaussian, so one scale per vector and a scalar codebook per
coordinate fit them all (TurboQuant, Zandieh et al. 2025: rotation, a Lloyd-Max codebook per
coordinate, one norm per vector; "quality neutral" at 3.5 bits). Keys and values get their own
widths (``rotk3v2``: 3-bit keys, 2-bit values), as KIVI and SKVQ treat them differently.

Per full block of ``bs`` tokens, for each head:

- keys: rotated, then centred on the block's mean per (rotated) channel (float16, ``D`` values):
  keys carry a large per-channel offset that a per-vector code would waste its levels on (KIVI's
  reason to quantize keys per channel). Values are not centred.
- each vector ``r`` (centred keys, values) gets the codes of its nearest levels at
  ``r / (||r|| / sqrt(D))``, then the least-squares scale ``s = <r, L[c]> / <L[c], L[c]>``
  (float16), where TurboQuant stores the norm.
- codes packed at their width (3 bits: eight codes in three bytes).

Decoding is ``(s * L[c] + mean) @ M_h.T``: blocks are un-rotated on read, so attention and every
other layer kind see plain keys and values (rotating the queries instead would save one
[bs, D] x [D, D] product per block and head, but ties the format to the attention path).
Simplified from the paper: no QJL residual bit for inner products (TurboQuant-prod); the rotation is
a randomized Hadamard transform rather than a dense random matrix where ``D`` is a power of two.
``codebook="uniform"`` swaps the Lloyd-Max levels for evenly spaced ones (same storage), to measure
what the codebook buys.

Buffer: ``[key means H*D | key scales H*bs | value scales H*bs`` (float16) ``| key codes | value codes]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

from kvmem.compress.codebook import lloyd_max, nearest, uniform
from kvmem.compress.packing import pack, packed_size, unpack
from kvmem.compress.rotation import rotate, rotations, unrotate
from kvmem.errors import KVMemError
from kvmem.model.format import Layout, write_parts

ROTATED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
_FP16_MAX = 65504.0


def vector_codes(r: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each vector's nearest codes at unit scale and its least-squares scale:
    r float32 [..., T, D] -> codes uint8 [..., T, D], scales float32 [..., T, 1]."""
    levels = levels.to(r.device)
    d = r.shape[-1]
    unit = r.norm(dim=-1, keepdim=True) / d**0.5  # [..., T, 1]
    codes = nearest(r / torch.where(unit > 0, unit, torch.ones_like(unit)), levels)
    q = levels[codes.long()]  # [..., T, D]
    denom = (q * q).sum(-1, keepdim=True)
    scale = (r * q).sum(-1, keepdim=True) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return codes, scale


def check_fp16(stats: list[torch.Tensor]) -> None:
    """Raise ``KVMemError`` if a statistic stored as float16 would not fit in it."""
    if any(bool((s.abs() > _FP16_MAX).any()) for s in stats):
        raise KVMemError("rotated quantizer: keys or values exceed float16's range")


@dataclass(frozen=True)
class RotatedLayout(Layout):
    heads: int
    block_size: int
    head_dim: int
    key_bits: int
    value_bits: int

    @property
    def key_means(self) -> int:  # float16 values
        return self.heads * self.head_dim

    @property
    def scales(self) -> int:  # float16 values per tensor (keys, values)
        return self.heads * self.block_size

    @property
    def key_codes(self) -> int:  # bytes
        return self.scales * packed_size(self.head_dim, self.key_bits)

    @property
    def value_codes(self) -> int:
        return self.scales * packed_size(self.head_dim, self.value_bits)

    @property
    def nbytes(self) -> int:
        return 2 * (self.key_means + 2 * self.scales) + self.key_codes + self.value_codes


Codebook = Literal["lloyd", "uniform"]


@dataclass(frozen=True)
class RotatedQuant:
    key_bits: int = 3
    value_bits: int = 2
    codebook: Codebook = "lloyd"
    seed: int = 0

    def __post_init__(self) -> None:
        for bits in (self.key_bits, self.value_bits):
            if bits not in ROTATED_BITS:
                raise ValueError(f"rotated quantizer bits must be one of {ROTATED_BITS}, got {bits}")
        if self.codebook not in ("lloyd", "uniform"):
            raise ValueError(f"codebook must be 'lloyd' or 'uniform', got {self.codebook!r}")

    @property
    def name(self) -> str:
        prefix = "rot" if self.codebook == "lloyd" else "rotu"
        if self.key_bits == self.value_bits:
            return f"{prefix}{self.key_bits}"
        return f"{prefix}k{self.key_bits}v{self.value_bits}"

    @property
    def bits(self) -> float:
        return (self.key_bits + self.value_bits) / 2

    @property
    def summary(self) -> str:
        book = "Lloyd-Max" if self.codebook == "lloyd" else "uniform"
        return (
            f"rotated (seeded Hadamard per head), {book} codes: keys {self.key_bits}-bit (centred per "
            f"block), values {self.value_bits}-bit, one float16 scale per vector; last block exact (or +res8)"
        )

    def levels(self, bits: int) -> torch.Tensor:
        return lloyd_max(bits) if self.codebook == "lloyd" else uniform(bits)

    def layout(self, heads: int, block_size: int, head_dim: int) -> RotatedLayout:
        return RotatedLayout(heads, block_size, head_dim, self.key_bits, self.value_bits)

    def encode(
        self, keys: torch.Tensor, values: torch.Tensor, layout: RotatedLayout, out: torch.Tensor
    ) -> None:
        """Full blocks (keys, values: [..., H, bs, D]) -> ``out`` uint8 [..., layout.nbytes]."""
        m = rotations(self.seed, layout.heads, layout.head_dim, keys.device)  # [H, D, D]
        k = rotate(keys, m)  # [..., H, bs, D] float32
        mean = k.mean(dim=-2, keepdim=True)  # [..., H, 1, D]
        k_codes, k_scale = vector_codes(k - mean, self.levels(self.key_bits))
        v_codes, v_scale = vector_codes(rotate(values, m), self.levels(self.value_bits))
        stats = [mean, k_scale, v_scale]
        check_fp16(stats)
        parts = [
            *(s.to(torch.float16) for s in stats),
            pack(k_codes, self.key_bits),
            pack(v_codes, self.value_bits),
        ]
        write_parts(out, layout.nbytes, parts)

    def decode(
        self, buffer: torch.Tensor, layout: RotatedLayout, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [..., nbytes] -> keys, values [..., H, bs, D] in ``dtype``."""
        lead = tuple(buffer.shape[:-1])
        h, bs, d = layout.heads, layout.block_size, layout.head_dim
        sizes = [
            2 * layout.key_means,
            2 * layout.scales,
            2 * layout.scales,
            layout.key_codes,
            layout.value_codes,
        ]
        mean_b, ks_b, vs_b, kc_b, vc_b = torch.split(buffer, sizes, dim=-1)
        mean = mean_b.contiguous().view(torch.float16).reshape(*lead, h, 1, d).float()
        k_scale = ks_b.contiguous().view(torch.float16).reshape(*lead, h, bs, 1).float()
        v_scale = vs_b.contiguous().view(torch.float16).reshape(*lead, h, bs, 1).float()

        def values_of(codes: torch.Tensor, bits: int) -> torch.Tensor:
            per_row = packed_size(d, bits)
            c = unpack(codes.reshape(*lead, h, bs, per_row), bits, d)  # [..., H, bs, D]
            return self.levels(bits).to(buffer.device)[c.long()]

        m = rotations(self.seed, h, d, buffer.device)
        keys = unrotate(k_scale * values_of(kc_b, self.key_bits) + mean, m)
        values = unrotate(v_scale * values_of(vc_b, self.value_bits), m)
        return keys.to(dtype), values.to(dtype)


def parse_rotated(name: str) -> RotatedQuant | None:
    """``rot3``, ``rotk3v2``, ``rotu4``, ``rotuk4v2`` -> the quantizer; anything else -> None."""
    match = re.fullmatch(r"rot(u?)(?:([1-8])|k([1-8])v([1-8]))", name)
    if match is None:
        return None
    book: Codebook = "uniform" if match.group(1) else "lloyd"
    kb = int(match.group(2) or match.group(3))
    vb = int(match.group(2) or match.group(4))
    return RotatedQuant(kb, vb, book)
