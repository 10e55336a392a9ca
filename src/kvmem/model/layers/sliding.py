"""``SlidingLayer``: a sliding-window layer (Gemma 3's local layers), bounded by its window.

It keeps the last ``window - 1`` tokens (plus at most one partly filled block), exactly what
transformers' ``DynamicSlidingWindowLayer`` keeps: blocks that fall out of the window are freed,
which is real memory saved. It is never evicted from: the window already bounds it.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvmem.model.layers.base import Kept, UnsupportedLayerError
from kvmem.model.layers.paged import PagedLayer
from kvmem.model.past import Past


class SlidingLayer(PagedLayer):
    kind: ClassVar[str] = "sliding"

    def past(self) -> Past:
        return self.blocks.past(last=self.keep)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        assert self.window is not None
        length = self.seq_length
        kv_offset = max(length - self.window + 1, 0)
        kv_length = (self.window - 1 if length >= self.window else length) + query_length
        return kv_length, kv_offset

    def scoring(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        raise UnsupportedLayerError("sliding-window layers are bounded by their window, not evicted from")

    def evict(self, kept: Kept) -> None:
        raise UnsupportedLayerError("sliding-window layers are bounded by their window, not evicted from")
