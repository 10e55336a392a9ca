"""``ListLayer``: the base of the layer kinds whose sequence is one block list (paged, sliding,
offload, mixed), what they share: ``blocks`` built from the layer's params, and the calls that
pass straight through to it (writing, reading, sizes, copying).

``blocks`` holds the tokens a layer budget counts, in position order, in the layer's block format;
a kind may hold others besides (mixed precision's demoted tokens) and then says so in ``parts``
and the sizes it overrides.
"""

from __future__ import annotations

import copy
from typing import TypeVar

import torch

from kvmem.kv.pool import KVPool
from kvmem.kv.table import BlockTable
from kvmem.model.format import Quantizer
from kvmem.model.layers.base import KVLayer, LayerParams
from kvmem.model.layers.blocks import BlockList
from kvmem.model.past import Past

Layer = TypeVar("Layer", bound="ListLayer")


class ListLayer(KVLayer):
    """A layer whose tokens are ``blocks`` (a sliding window's last ``keep`` only)."""

    def __init__(self, params: LayerParams) -> None:
        super().__init__(params)
        p = params
        self.blocks = BlockList(
            p.pool, p.num_heads, p.head_dim, p.dtype, p.fmt, self.keep, self.device, residual=p.residual
        )

    @property
    def table(self) -> BlockTable:
        return self.blocks.table

    @property
    def fmt(self) -> Quantizer | None:
        return self.blocks.fmt

    def parts(self) -> dict[str, BlockList]:
        return {"": self.blocks}

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

    def copy_to(self: Layer, pool: KVPool) -> Layer:
        """A copy with ``blocks`` and the scorer state its own; a kind with more state extends it."""
        new = copy.copy(self)
        new.pool = pool
        new.blocks = self.blocks.copy_to(pool)
        self._copy_state(new)
        return new
