"""``MixedLayer``: a full-attention layer in two precisions, the important tokens and the demoted ones.

Mixed precision (``kvmem.compress.mixed``) keeps the tokens an eviction would drop in a second,
low-precision block list instead. ``high`` holds the important tokens as any layer does (full
precision, or the policy's block format); ``low`` holds the demoted ones in a low-bit format
(KIVI 2-bit by default: packed codes, counted by the pool), in whole blocks only: demoted tokens
are moved a block at a time and quantized at once, so ``low`` holds no full-precision residual
(the few demoted tokens short of a whole block are dropped). Attention sees ``low`` then ``high``:
order among past tokens does not matter (RoPE is applied before storage) and the newest tokens
stay last.

A layer's room is the bytes of its static split (``capacity`` high tokens and ``ratio`` times as
many low ones); within it every token is kept while it fits (``split``): as the context grows the
high share shrinks, the lowest-scored tokens demoted, and only once even a store of nothing but
low blocks would overflow are the oldest low blocks dropped.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvmem.kv.pool import KVPool
from kvmem.model.format import Quantizer
from kvmem.model.layers.base import Kept, LayerParams
from kvmem.model.layers.blocks import BlockList
from kvmem.model.layers.listed import ListLayer
from kvmem.model.past import Past, dense_ref


class MixedLayer(ListLayer):
    """``held`` counts the high-precision tokens (what a layer budget's capacity counts); ``low``
    may hold ``ratio`` times that capacity besides."""

    kind: ClassVar[str] = "mixed"

    def __init__(self, params: LayerParams, low: Quantizer | None = None, low_share: float = 0.5) -> None:
        assert params.window is None and low is not None, (
            "mixed precision is for full-attention layers, with a low format"
        )
        super().__init__(params)
        p = params
        self.low = BlockList(p.pool, p.num_heads, p.head_dim, p.dtype, low, None, self.device, whole=True)
        # low-precision tokens per high-precision token, so that `low_share` of the bytes go low
        high_block = self.high.cost_of_blocks(2) - self.high.cost_of_blocks(1)
        low_block = self.low.cost_of_blocks(2) - self.low.cost_of_blocks(1)
        self.ratio = max(1, round(high_block / low_block * low_share / (1 - low_share)))

    @property
    def high(self) -> BlockList:
        """The important tokens, at the layer's own precision (``blocks``)."""
        return self.blocks

    def parts(self) -> dict[str, BlockList]:
        return {".high": self.high, ".low": self.low}

    @property
    def num_low(self) -> int:
        return self.low.held

    @property
    def tokens_held(self) -> int:
        return self.high.held + self.low.held

    def past(self) -> Past:
        high = self.high.past()
        if not self.low.held:
            return high
        low_k, low_v = self.low.dense()  # [H, n_low, D], dequantized
        packed = [(i + 1, buffer) for i, buffer in high.packed]
        return Past(
            [low_k, *high.keys],
            [low_v, *high.values],
            0,
            low_k.shape[1] + high.count,
            self.dtype,
            packed,
            high.fmt,
            high.layout,
            refs=[dense_ref(low_k, low_v), *high.refs],
        )

    def scoring(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Only the high-precision tokens compete."""
        keys, values = self.high.dense()
        attention = None if self.attention is None else self.attention[:, self.num_low :]
        return keys, values, attention, None

    def cost_of_blocks(self, n: int) -> int:
        """Most bytes with ``n`` high-precision blocks and ``ratio * n`` low ones."""
        return 0 if n == 0 else self.high.cost_of_blocks(n) + self.low.cost_of_blocks(self.ratio * n)

    def split(self, capacity: int, tokens: int, need: int = 0) -> tuple[int, int]:
        """(high, low) tokens to hold when ``tokens`` in all should fit the bytes of ``capacity``
        high tokens at the static split: as many high blocks as leave room for every other token
        in low blocks (never more than ``capacity``'s, at least enough for ``need`` arriving
        tokens and one kept), the rest of the room low."""
        bs = self.high.block_size
        most = max(1, capacity // bs)
        least = min(most, -(-(need + 1) // bs))
        room = self.cost_of_blocks(most)
        high = self.high.cost_of_blocks(2) - self.high.cost_of_blocks(1)  # a high block's bytes
        base = self.high.cost_of_blocks(1) - high  # the residual block's
        low = self.low.cost_of_blocks(2) - self.low.cost_of_blocks(1)
        blocks = -(-tokens // bs)
        fitting = (room - base - blocks * low) // (high - low) if high > low else most
        n_high = max(least, min(most, fitting))
        return n_high * bs, max(0, (room - base - n_high * high) // low) * bs

    def capacity_for(self, capacity: int, need: int) -> int:
        return self.split(capacity, self.held + self.num_low + need, need)[0]

    def bytes_to_append(self, q: int) -> tuple[int, int]:
        before, after = self.high.bytes_to_append(q)
        return before + self.low.nbytes, after + self.low.nbytes

    def max_bytes_to_grow(self, n: int) -> int:
        return self.high.max_bytes_to_grow(n) + self.low.nbytes

    def evict(self, kept: Kept) -> None:
        """Keep ``chosen`` at high precision and demote the rest to ``low``, within the room of
        ``capacity`` left once ``need`` more tokens arrive (``split``)."""
        if kept.capacity is None or kept.keys is not None or kept.values is not None:
            raise NotImplementedError(
                "a mixed-precision layer demotes within a fixed capacity, without merging"
            )
        low_capacity = self.split(kept.capacity, self.held + self.num_low + kept.need, kept.need)[1]
        self.demote(kept.chosen, low_capacity)

    @torch.inference_mode()
    def demote(self, keep: torch.Tensor, low_capacity: int) -> None:
        """Keep the high-precision slots ``keep`` ([H, k], ascending per head); move the others to
        ``low``, which then holds at most ``low_capacity`` tokens: its oldest blocks go first, then,
        if still over, the demoted tokens that came last; whole blocks only (the rest is dropped)."""
        heads, held = keep.shape[0], self.high.held
        dropped = torch.ones((heads, held), dtype=torch.bool, device=keep.device)
        dropped.scatter_(1, keep, False)
        demoted = dropped.nonzero()[:, 1].view(heads, -1)  # [H, d], ascending per head
        bs, n_low = self.low.block_size, self.low.held
        old_blocks = 0  # oldest low blocks to drop, all full
        while n_low - old_blocks * bs + demoted.shape[1] > low_capacity and (old_blocks + 1) * bs <= n_low:
            old_blocks += 1
        room = max(0, low_capacity - (n_low - old_blocks * bs))
        demoted = demoted[:, : min(room, demoted.shape[1]) // bs * bs]
        high_k, high_v = self.high.dense()  # [H, T_high, D]
        index = demoted.unsqueeze(-1).expand(-1, -1, self.head_dim)
        moved_k, moved_v = high_k.gather(1, index), high_v.gather(1, index)  # [H, d, D]
        if self.attention is not None:  # gathered order afterwards: low kept, demoted, high kept
            low_att, high_att = self.attention[:, :n_low], self.attention[:, n_low:]
            self.attention = torch.cat(
                [low_att[:, old_blocks * bs :], high_att.gather(1, demoted), high_att.gather(1, keep)], dim=1
            )
        self.high.compact(keep)
        for _ in range(old_blocks):
            self.low.drop_block(0)
        self.low.append(moved_k, moved_v)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        t = self.low.held + self.high.held
        return t + query_length, self.seq_length - t

    def copy_to(self, pool: KVPool) -> MixedLayer:
        new = super().copy_to(pool)
        new.low = self.low.copy_to(pool)
        return new
