"""Block floating point with outlier-channel reordering (Trukhanov & Soloveychik, 2024).

"Accurate Block Quantization in LLMs with Outliers": each token's channels are cut into groups of
``block`` consecutive channels that share one exponent; each element keeps a signed ``bits``-bit
mantissa. A few key channels are outliers (much larger than the rest), and one outlier ruins
the exponent of every block it lands in. So the key channels of each head are permuted once per
layer, sorted by magnitude, so that channels of similar size share a block and the outliers
share few. Values have no such channels: they are blocked in their own channel order.

The format, for a block of ``x`` (``M = 2**(bits-1) - 1``, 7 for 4 bits and 127 for 8):

- exponent ``e = ceil(log2(max|x| / M))``, the smallest with ``max|x| <= M * 2**e``: no mantissa
  overflows and every element is within ``2**(e-1)`` (half a step) of its decoded value.
  Stored as ``int8``, clamped to ``[-127, 127]``: blocks smaller than ``M * 2**-127``, zero blocks
  among them, use ``-127`` (still within the bound; zeros decode to exactly zero). The upper
  clamp is never reached by finite float32 inputs (all below ``2**128 <= M * 2**127``).
- mantissa ``m = round(x / 2**e)`` in ``[-M, M]``: sign-magnitude's range (two's complement's
  extra ``-M - 1`` is left unused, so both signs fit the same magnitude), stored as the offset
  code ``m + M + 1`` in ``[1, 2**bits)`` and packed two per byte for 4 bits.

The permutation is chosen from the first block encoded on a layer (channels of each head sorted
by their largest ``|key|`` in that block) and kept on the layer's layout for every later block.
Each buffer holds it too (one byte per head and channel), so a block decodes on its own.

Buffer: ``[permutation H*D | key exponents | value exponents | key mantissas | value mantissas]``,
exponents ``H*bs*D/block`` bytes each, mantissas ``H*bs*D*bits/8`` bytes each.

Measured on SmolLM2-135M (1,000-token context, 100 tokens): sorting lowers the keys' squared
error by about 5%, yet raises next-token KL (BFP-4: 0.127 sorted, 0.068 unsorted; KIVI-4: 0.006):
likely because it sharpens the many small channels and blurs the large ones, which queries weigh most.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvmem.compress.packing import pack, packed_size, unpack
from kvmem.errors import KVMemError
from kvmem.model.format import Layout, write_parts

EXPONENT_RANGE = 127  # exponents are int8, clamped to [-127, 127]


@dataclass(eq=False)
class BFPLayout(Layout):
    """Where each part of a BFP block sits in its byte buffer, and the layer's key permutation.

    Not frozen, unlike KIVI's layout: ``PagedLayer`` makes one layout per layer and passes it to
    every ``encode`` and ``decode``, so it is where the layer's permutation lives, set once by the
    layer's first encoded block. Geometry fields are never changed after construction.
    """

    heads: int
    block_size: int
    head_dim: int
    bits: int
    group: int  # channels sharing one exponent
    reorder: bool
    permutation: torch.Tensor | None = None  # [H, D] int64: slot j of head h holds channel perm[h, j]

    @property
    def exponents(self) -> int:  # bytes of exponents, for the keys or for the values
        return self.heads * self.block_size * (self.head_dim // self.group)

    @property
    def mantissas(self) -> int:  # bytes of packed mantissas, for the keys or for the values
        return self.exponents * packed_size(self.group, self.bits)

    @property
    def permutation_bytes(self) -> int:
        return self.heads * self.head_dim if self.reorder else 0

    @property
    def nbytes(self) -> int:
        return self.permutation_bytes + 2 * self.exponents + 2 * self.mantissas

    @property
    def layer_state(self) -> bool:
        return self.reorder

    def state(self) -> dict[str, torch.Tensor]:
        return {} if self.permutation is None else {"permutation": self.permutation}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        unknown = set(state) - ({"permutation"} if self.reorder else set())
        if unknown:
            raise ValueError(f"a BFP layout holds no {sorted(unknown)}")
        if "permutation" in state:
            self.permutation = state["permutation"]


def channel_order(keys: torch.Tensor) -> torch.Tensor:
    """Each head's channels sorted by their largest magnitude over the tokens: keys [H, T, D] -> [H, D]."""
    return keys.abs().amax(dim=1).argsort(dim=-1, stable=True)


def quantize(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [..., n] in blocks of ``group`` along the last axis: exponents int8 [..., n / group]
    and packed offset mantissas uint8 [..., n / group, group * bits / 8]."""
    limit = (1 << (bits - 1)) - 1  # M
    blocks = x.float().unflatten(-1, (-1, group))  # [..., G, B]
    peak = blocks.abs().amax(dim=-1)  # [..., G]
    if not bool(torch.isfinite(peak).all()):
        raise KVMemError("BFP: keys or values are not finite; use a policy without quantization")
    exp = torch.ceil(torch.log2(peak / limit)).clamp(-EXPONENT_RANGE, EXPONENT_RANGE)
    # log2 may be off by an ulp: settle on the smallest e with peak <= M * 2**e (exact comparisons)
    exp = torch.where(peak > limit * torch.exp2(exp), exp + 1, exp)
    exp = torch.where(peak <= limit * torch.exp2(exp - 1), exp - 1, exp)
    exp = exp.clamp(-EXPONENT_RANGE, EXPONENT_RANGE)
    mantissa = torch.round(blocks / torch.exp2(exp).unsqueeze(-1)).clamp(-limit, limit)
    return exp.to(torch.int8), pack(mantissa + (limit + 1), bits)


def dequantize(exponents: torch.Tensor, codes: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Inverse of ``quantize``: float32 [..., n]."""
    mantissa = unpack(codes, bits, group).float() - (1 << (bits - 1))  # [..., G, B]
    return (mantissa * torch.exp2(exponents.float()).unsqueeze(-1)).flatten(-2)


@dataclass(frozen=True)
class BlockFloat:
    bits: int = 4  # mantissa bits, sign included
    block: int = 16  # channels sharing one exponent (the gcd with head_dim if it does not divide it)
    reorder: bool = True  # permute key channels by magnitude before blocking

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"BFP mantissa bits must be 4 or 8, got {self.bits}")
        if self.block <= 0:
            raise ValueError(f"BFP block must be positive, got {self.block}")

    @property
    def name(self) -> str:
        return f"bfp{self.bits}"

    @property
    def summary(self) -> str:
        reorder = ", key channels sorted by size" if self.reorder else ""
        return f"block floating point {self.bits}-bit: an exponent per {self.block} channels{reorder}"

    def layout(self, heads: int, block_size: int, head_dim: int) -> BFPLayout:
        if self.reorder and head_dim > 256:
            raise ValueError(f"BFP stores its permutation in one byte per channel: head_dim {head_dim} > 256")
        return BFPLayout(heads, block_size, head_dim, self.bits, math.gcd(self.block, head_dim), self.reorder)

    def encode(self, keys: torch.Tensor, values: torch.Tensor, layout: BFPLayout, out: torch.Tensor) -> None:
        """Quantize full blocks (keys, values: [..., H, bs, D]) into ``out`` (uint8 [..., layout.nbytes]).

        The layer's first call sets ``layout.permutation`` from its first block; later calls reuse it."""
        parts = []
        blocks = keys.reshape(-1, *keys.shape[-3:]).shape[0]
        if layout.reorder:
            if layout.permutation is None:  # chosen from the first block the layer encodes
                layout.permutation = channel_order(keys.reshape(-1, *keys.shape[-3:])[0])
            order = layout.permutation
            keys = keys.gather(-1, order.unsqueeze(-2).expand_as(keys))  # [..., H, bs, D], channels sorted
            parts.append(order.to(torch.uint8).expand(blocks, *order.shape))
        k_exp, k_codes = quantize(keys, self.bits, layout.group)
        v_exp, v_codes = quantize(values, self.bits, layout.group)
        parts += [k_exp.view(torch.uint8), v_exp.view(torch.uint8), k_codes, v_codes]
        write_parts(out, layout.nbytes, parts)

    def decode(
        self, buffer: torch.Tensor, layout: BFPLayout, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of ``encode``, from the buffer alone: uint8 [..., nbytes] -> keys, values
        [..., H, bs, D]. Any leading dimensions decode together (a layer's stacked blocks)."""
        lead = tuple(buffer.shape[:-1])
        h, bs, d, group = layout.heads, layout.block_size, layout.head_dim, layout.group
        sizes = [layout.permutation_bytes] + [layout.exponents] * 2 + [layout.mantissas] * 2
        order, k_exp, v_exp, k_codes, v_codes = torch.split(buffer, sizes, dim=-1)
        blocks = (*lead, h, bs, d // group)

        def part(exp: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
            exponents = exp.contiguous().view(torch.int8).reshape(blocks)
            return dequantize(exponents, codes.reshape(*blocks, -1), self.bits, group)

        keys, values = part(k_exp, k_codes), part(v_exp, v_codes)  # [..., H, bs, D]
        if layout.reorder:  # slot j of head h goes back to channel order[h, j]
            index = order.reshape(*lead, h, 1, d).long().expand(*lead, h, bs, d)
            keys = torch.empty_like(keys).scatter_(-1, index, keys)
        return keys.to(dtype), values.to(dtype)
