"""KIVI (Liu et al., 2024): keys quantized per channel, values per token, recent tokens kept exact.

A full block of ``block_size`` tokens is quantized as soon as the next block starts, so the
full-precision residual is the last, partly filled block (at most ``block_size - 1`` tokens; the
paper's residual is a separate window of up to 128 tokens). Keys: for each channel, groups of
``group_size`` consecutive tokens share a scale and zero point; values: for each token, groups of
``group_size`` channels. Codes are packed 2/4/8-bit in ``uint8``; scales and zero points are
float16. Everything of a block lives in one ``uint8`` buffer, so the pool counts its real bytes.
Attention dequantizes on the fly (the paper uses fused kernels instead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvmem.compress.groupquant import QuantizedTensor, dequantize, quantize
from kvmem.compress.packing import packed_size
from kvmem.errors import KVMemError
from kvmem.model.format import Layout, write_parts

KIVI_BITS = (2, 4, 8)  # the widths kvmem's compiled decode attention reads in place


@dataclass(frozen=True)
class BlockLayout(Layout):
    """Where each part of a quantized block sits in its byte buffer."""

    heads: int
    block_size: int
    head_dim: int
    bits: int
    key_group: int
    value_group: int

    @property
    def key_groups(self) -> int:  # per head and channel
        return self.block_size // self.key_group

    @property
    def value_groups(self) -> int:  # per head and token
        return self.head_dim // self.value_group

    @property
    def key_stats(self) -> int:  # float16 values per stat tensor
        return self.heads * self.head_dim * self.key_groups

    @property
    def value_stats(self) -> int:
        return self.heads * self.block_size * self.value_groups

    @property
    def key_codes(self) -> int:  # bytes
        return self.key_stats * packed_size(self.key_group, self.bits)

    @property
    def value_codes(self) -> int:
        return self.value_stats * packed_size(self.value_group, self.bits)

    @property
    def nbytes(self) -> int:
        return 2 * 2 * (self.key_stats + self.value_stats) + self.key_codes + self.value_codes

    @property
    def kernel_geometry(self) -> tuple[int, int, int, int, int]:  # KIVI_BITS only: the kernel reads them all
        """What kvmem's compiled attention needs to decode this layout in place (``kvmem.model.kernel``):
        heads, block size, bits, key group, value group."""
        return (self.heads, self.block_size, self.bits, self.key_group, self.value_group)


@dataclass(frozen=True)
class KIVI:
    bits: int = 4
    group_size: int = 32

    def __post_init__(self) -> None:
        if self.bits not in KIVI_BITS:
            raise ValueError(f"KIVI bits must be one of {KIVI_BITS}, got {self.bits}")

    @property
    def name(self) -> str:
        return f"kivi{self.bits}"

    @property
    def summary(self) -> str:
        return f"KIVI {self.bits}-bit: keys per channel, values per token, last block exact (or +res8)"

    def layout(self, heads: int, block_size: int, head_dim: int) -> BlockLayout:
        return BlockLayout(
            heads,
            block_size,
            head_dim,
            self.bits,
            math.gcd(self.group_size, block_size),
            math.gcd(self.group_size, head_dim),
        )

    def encode(
        self, keys: torch.Tensor, values: torch.Tensor, layout: BlockLayout, out: torch.Tensor
    ) -> None:
        """Quantize full blocks (keys, values: [..., H, bs, D]) into ``out`` (uint8 [..., layout.nbytes]);
        any leading dimensions encode together, each block on its own."""
        qk = quantize(keys.transpose(-1, -2), self.bits, layout.key_group)  # per channel: [..., H, D, bs]
        qv = quantize(values, self.bits, layout.value_group)  # per token: [..., H, bs, D]
        if qk.scale.dtype != torch.float16 or qv.scale.dtype != torch.float16:
            raise KVMemError("KIVI: keys or values exceed float16's range; use a policy without quantization")
        parts = [qk.scale, qk.zero, qv.scale, qv.zero, qk.packed, qv.packed]
        write_parts(out, layout.nbytes, parts)

    def decode(
        self, buffer: torch.Tensor, layout: BlockLayout, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of ``encode``: buffers uint8 [..., nbytes] -> keys, values [..., H, bs, D].

        Any leading dimensions decode together (a layer's stacked blocks in one call)."""
        lead = tuple(buffer.shape[:-1])
        h, bs, d = layout.heads, layout.block_size, layout.head_dim
        sizes = (
            [2 * layout.key_stats] * 2 + [2 * layout.value_stats] * 2 + [layout.key_codes, layout.value_codes]
        )
        chunks = list(torch.split(buffer, sizes, dim=-1))
        k_scale, k_zero, v_scale, v_zero = (c.contiguous().view(torch.float16) for c in chunks[:4])

        def unpacked(
            codes: torch.Tensor,
            scale: torch.Tensor,
            zero: torch.Tensor,
            shape: tuple[int, ...],
            group: int,
        ) -> torch.Tensor:
            # codes and stats of a [..., H, rows, cols] tensor quantized in groups along cols
            grouped = (*shape[:-1], shape[-1] // group)
            quantized = QuantizedTensor(
                codes.reshape(*grouped, -1),
                scale.reshape(*grouped, 1),
                zero.reshape(*grouped, 1),
                self.bits,
                group,
                len(shape) - 1,
                shape,
                dtype,
            )
            return dequantize(quantized)

        keys = unpacked(chunks[4], k_scale, k_zero, (*lead, h, d, bs), layout.key_group)  # [..., H, D, bs]
        values = unpacked(chunks[5], v_scale, v_zero, (*lead, h, bs, d), layout.value_group)  # [.., H, bs, D]
        return keys.transpose(-1, -2).to(dtype), values.to(dtype)
