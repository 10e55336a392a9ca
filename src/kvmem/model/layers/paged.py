"""``PagedLayer``: a full-attention layer, its tokens in one block list (full precision or a block format)."""

from __future__ import annotations

import copy
from typing import ClassVar

import torch

from kvmem.kv.pool import KVPool
from kvmem.kv.table import BlockTable
from kvmem.model.format import Quantizer, TokenFormat
from kvmem.model.layers.base import KVLayer
from kvmem.model.layers.blocks import BlockList
from kvmem.model.past import Past


class PagedLayer(KVLayer):
    """Every token seen (or, after eviction, the ones kept), in position order, in ``blocks``.

    With a block format (KIVI, BFP, …) full blocks are stored quantized and the last, partly
    filled block is the residual: full precision, or in the ``residual`` format.
    """

    kind: ClassVar[str] = "paged"

    def __init__(
        self,
        pool: KVPool,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        layer_idx: int = 0,
        window: int | None = None,
        device: torch.device | None = None,
        fmt: Quantizer | None = None,
        residual: TokenFormat | None = None,
    ) -> None:
        super().__init__(pool, num_heads, head_dim, dtype, layer_idx, window, device)
        self.blocks = BlockList(
            pool, num_heads, head_dim, dtype, fmt, self.keep, self.device, residual=residual
        )

    @property
    def table(self) -> BlockTable:
        return self.blocks.table

    @property
    def fmt(self) -> Quantizer | None:
        return self.blocks.fmt

    def parts(self) -> dict[str, BlockList]:
        return {"": self.blocks}

    def stream(self) -> BlockList:
        return self.blocks

    @property
    def held(self) -> int:
        return self.blocks.held

    @property
    def seq_length(self) -> int:
        return self.blocks.length

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.blocks.append(k, v)

    def past(self) -> Past:
        return self.blocks.past()

    def cost_of_blocks(self, n: int) -> int:
        return self.blocks.cost_of_blocks(n)

    def bytes_to_append(self, q: int) -> tuple[int, int]:
        return self.blocks.bytes_to_append(q)

    def max_bytes_to_grow(self, n: int) -> int:
        return self.blocks.max_bytes_to_grow(n)

    def scoring(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        keys, values = self.blocks.dense()
        return keys, values, self.attention, None

    def keep_slots(
        self,
        chosen: torch.Tensor,
        capacity: int | None = None,
        kept_keys: torch.Tensor | None = None,
        kept_values: torch.Tensor | None = None,
        need: int = 0,
    ) -> None:
        """Keep ``chosen`` and free the rest: kept tokens move to the front of the layer's blocks."""
        self.blocks.compact(chosen, kept_keys, kept_values)
        if self.attention is not None:
            self.attention = self.attention.gather(1, chosen)

    def copy_to(self, pool: KVPool) -> PagedLayer:
        new = copy.copy(self)
        new.pool = pool
        new.blocks = self.blocks.copy_to(pool)
        self._copy_state(new)
        return new
