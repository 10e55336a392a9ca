"""The residual block at low bits: the block still being filled, encoded token by token as it fills.

A block format (KIVI, rotated, BFP) encodes whole blocks, so a block list keeps its last, partly
filled block in the model's dtype until it is full. At 1k tokens in float32 that residual is about
1.5 bits per element of the whole cache (64 tokens at 32 bits per layer). ``RotatedTokens`` holds
it at ``bits`` instead (``res8``: 8-bit codes): every token is rotated by the same seeded Hadamard
matrix per head as the rotated block formats (``kvmem.compress.rotation``), which spreads outlier
channels, and each vector gets symmetric integer codes in ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` on
its own float16 scale (its largest coordinate over the largest code), so a token is written once,
into its own slot, and never re-encoded until its block is full. The block format then
encodes the full block from these decoded tokens (the tokens are quantized twice; at 8 bits the
first pass is far below the second's error).

This is the "recent window at 8 bits" of MiKV / ZipCache, at block granularity: the newest
tokens (up to a block) are at 8 bits, older ones at the block format's bits. The tokens a forward
computes attend to their own keys in full precision; only later forwards read them back.

Buffer: ``[key scales H*bs | value scales H*bs`` (float16) ``| key codes | value codes]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from kvmem.compress.packing import pack, packed_size, unpack
from kvmem.compress.rotated import check_fp16
from kvmem.compress.rotation import rotate, rotations, unrotate
from kvmem.model.format import Layout

RESIDUAL_BITS = (4, 5, 6, 7, 8)


@dataclass(frozen=True)
class TokenLayout(Layout):
    heads: int
    block_size: int
    head_dim: int
    bits: int

    @property
    def scales(self) -> int:  # float16 values per tensor (keys, values)
        return self.heads * self.block_size

    @property
    def codes(self) -> int:  # bytes per tensor
        return self.scales * packed_size(self.head_dim, self.bits)

    @property
    def nbytes(self) -> int:
        return 2 * (2 * self.scales) + 2 * self.codes


@dataclass(frozen=True)
class RotatedTokens:
    """Keys and values of the residual block at ``bits`` (rotated, one scale per vector)."""

    bits: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.bits not in RESIDUAL_BITS:
            raise ValueError(f"residual bits must be one of {RESIDUAL_BITS}, got {self.bits}")

    @property
    def name(self) -> str:
        return f"res{self.bits}"

    @property
    def summary(self) -> str:
        return (
            f"the block still being filled at {self.bits}-bit rotated codes, token by token (one "
            "float16 scale per vector), instead of the model's dtype; combines with a block format"
        )

    def layout(self, heads: int, block_size: int, head_dim: int) -> TokenLayout:
        return TokenLayout(heads, block_size, head_dim, self.bits)

    @property
    def top(self) -> int:
        """The largest code magnitude: codes are ``top + q`` for q in ``[-top, top]``."""
        return (1 << (self.bits - 1)) - 1

    def _codes(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """r float32 [..., n, D] -> codes uint8 [..., n, D], scales float16 [..., n, 1]."""
        scale = (r.abs().amax(dim=-1, keepdim=True) / self.top).to(torch.float16)  # [..., n, 1]
        check_fp16([scale.float()])
        safe = torch.where(scale > 0, scale, torch.ones_like(scale)).float()
        q = torch.round(r / safe).clamp(-self.top, self.top)
        return (q + self.top).to(torch.uint8), scale

    def _parts(
        self, buffer: torch.Tensor, layout: TokenLayout
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of ``buffer``: key scales, value scales (float16 [H, bs]), key codes, value codes
        (uint8 [H, bs, packed D])."""
        h, bs = layout.heads, layout.block_size
        row = packed_size(layout.head_dim, self.bits)
        ks, vs, kc, vc = torch.split(
            buffer, [2 * layout.scales, 2 * layout.scales, layout.codes, layout.codes]
        )
        return (
            ks.view(torch.float16).view(h, bs),
            vs.view(torch.float16).view(h, bs),
            kc.view(h, bs, row),
            vc.view(h, bs, row),
        )

    def write(
        self, keys: torch.Tensor, values: torch.Tensor, layout: TokenLayout, out: torch.Tensor, start: int
    ) -> None:
        """keys, values [H, n, D] -> slots ``[start, start + n)`` of ``out`` (uint8 [nbytes])."""
        n = keys.shape[1]
        assert 0 <= start and start + n <= layout.block_size, "slots beyond the block"
        m = rotations(self.seed, layout.heads, layout.head_dim, keys.device)  # [H, D, D]
        k_codes, k_scale = self._codes(rotate(keys, m))  # [H, n, D], [H, n, 1]
        v_codes, v_scale = self._codes(rotate(values, m))
        ks, vs, kc, vc = self._parts(out, layout)
        ks[:, start : start + n] = k_scale.squeeze(-1)
        vs[:, start : start + n] = v_scale.squeeze(-1)
        kc[:, start : start + n] = pack(k_codes, self.bits)
        vc[:, start : start + n] = pack(v_codes, self.bits)

    def read(
        self, buffer: torch.Tensor, layout: TokenLayout, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [nbytes] -> keys, values [H, bs, D] in ``dtype``."""
        ks, vs, kc, vc = self._parts(buffer, layout)
        m = rotations(self.seed, layout.heads, layout.head_dim, buffer.device)

        def decoded(scales: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
            c = unpack(codes, self.bits, layout.head_dim)  # [H, bs, D]
            return unrotate(scales.float().unsqueeze(-1) * (c.float() - self.top), m)

        return decoded(ks, kc).to(dtype), decoded(vs, vc).to(dtype)


def parse_residual(name: str) -> RotatedTokens | None:
    """``res8`` (or ``res4`` … ``res7``) -> the residual format; anything else -> None."""
    match = re.fullmatch(r"res([4-8])", name)
    return None if match is None else RotatedTokens(int(match.group(1)))
