"""A block table: which blocks hold one layer of one sequence, in token order. Plain Python.

Tokens ``[start, length)`` of the sequence are held, packed from slot 0 of the first block; only
the last block may be partly filled. ``start`` moves forward when a sliding-window layer drops
blocks that fell out of its window. After a compression policy evicts tokens, the layer holds a
subset of the positions seen, in position order, and ``start = length - held``.
"""

from __future__ import annotations

from typing import NamedTuple


class AppendPlan(NamedTuple):
    """What appending ``q`` tokens does to a table, computed without changing it."""

    drop_blocks: int  # leading blocks released first (out of the window)
    skip_tokens: int  # leading new tokens not stored (already out of the window)
    new_blocks: int  # blocks allocated for the stored tokens
    blocks_after: int  # blocks held afterwards


class BlockTable:
    def __init__(self, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.block_ids: list[int] = []
        self.start = 0
        self.length = 0

    @property
    def num_held(self) -> int:
        """Tokens physically held."""
        return self.length - self.start

    @property
    def last_fill(self) -> int:
        """Tokens in the last block (0 when there is no block)."""
        if not self.block_ids:
            return 0
        return self.num_held - (len(self.block_ids) - 1) * self.block_size

    def plan_append(self, q: int, keep: int | None) -> AppendPlan:
        """Plan appending ``q`` tokens when only the last ``keep`` tokens must stay (None: all)."""
        bs = self.block_size
        new_length = self.length + q
        kept_from = 0 if keep is None else max(0, new_length - keep)
        skip = max(0, kept_from - self.length)
        if skip > 0:  # every held token is out of the window: start afresh
            drop = len(self.block_ids)
        else:
            drop = 0
            while drop < len(self.block_ids) and self.start + (drop + 1) * bs <= kept_from:
                drop += 1
        remaining = len(self.block_ids) - drop
        stored = q - skip
        if remaining == 0:
            new_blocks = -(-stored // bs)
        else:
            free_slots = bs - self.last_fill
            new_blocks = -(-max(0, stored - free_slots) // bs)
        return AppendPlan(drop, skip, new_blocks, remaining + new_blocks)

    def check(self) -> None:
        assert 0 <= self.start <= self.length
        assert len(self.block_ids) == -(-self.num_held // self.block_size), "blocks do not match tokens held"
        assert len(set(self.block_ids)) == len(self.block_ids), "a block is twice in one table"
