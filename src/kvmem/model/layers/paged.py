"""``PagedLayer``: a full-attention layer, its tokens in one block list (full precision or a block format)."""

from __future__ import annotations

from typing import ClassVar

import torch

from kvmem.model.layers.base import Kept
from kvmem.model.layers.blocks import BlockList
from kvmem.model.layers.listed import ListLayer


class PagedLayer(ListLayer):
    """Every token seen (or, after eviction, the ones kept), in position order, in ``blocks``.

    With a block format (KIVI, BFP, …) full blocks are stored quantized and the last, partly
    filled block is the residual: full precision, or in the ``residual`` format.
    """

    kind: ClassVar[str] = "paged"

    def stream(self) -> BlockList:
        return self.blocks

    def scoring(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        keys, values = self.blocks.dense()
        return keys, values, self.attention, None

    def evict(self, kept: Kept) -> None:
        """Keep ``chosen`` and free the rest: kept tokens move to the front of the layer's blocks."""
        self.blocks.compact(kept.chosen, kept.keys, kept.values)
        if self.attention is not None:
            self.attention = self.attention.gather(1, kept.chosen)
