"""Block bookkeeping in plain Python: ids, ref counts, bytes, the budget. No tensors here.

A block is one layer's keys and values for ``block_size`` consecutive tokens. Blocks may differ
in size (layers differ; later, compressed blocks), so the budget is counted in bytes.
"""

from __future__ import annotations

from collections import deque

from kvmem.errors import KVBudgetError


class BlockManager:
    """Allocates block ids under a byte budget and tracks their reference counts.

    Contract:
    - ``allocate`` either returns a new id with ref count 1 or raises ``KVBudgetError`` and changes nothing.
    - ``decref`` releases the block when its count reaches zero; the caller then drops its tensors.
    - ``bytes_used`` is the sum of the sizes of live blocks and never exceeds ``budget``.
    """

    def __init__(self, budget: int | None) -> None:
        self.budget = budget
        self._free_ids: deque[int] = deque()
        self._next_id = 0
        self._refs: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        self._bytes_used = 0

    @property
    def bytes_used(self) -> int:
        return self._bytes_used

    @property
    def bytes_free(self) -> int | None:
        """Bytes still allocatable, or ``None`` when the budget is unlimited."""
        return None if self.budget is None else self.budget - self._bytes_used

    @property
    def num_blocks(self) -> int:
        return len(self._refs)

    def can_allocate(self, nbytes: int) -> bool:
        return self.budget is None or self._bytes_used + nbytes <= self.budget

    def allocate(self, nbytes: int) -> int:
        if nbytes <= 0:
            raise ValueError(f"a block must hold at least one byte, got {nbytes}")
        if not self.can_allocate(nbytes):
            free = self.bytes_free
            assert free is not None and self.budget is not None
            raise KVBudgetError(nbytes, free, self.budget, what="a new KV block")
        block_id = self._free_ids.popleft() if self._free_ids else self._take_new_id()
        self._refs[block_id] = 1
        self._sizes[block_id] = nbytes
        self._bytes_used += nbytes
        return block_id

    def _take_new_id(self) -> int:
        block_id = self._next_id
        self._next_id += 1
        return block_id

    def incref(self, block_id: int) -> None:
        self._check_live(block_id)
        self._refs[block_id] += 1

    def decref(self, block_id: int) -> bool:
        """Drop one reference; return True when this released the block."""
        self._check_live(block_id)
        self._refs[block_id] -= 1
        if self._refs[block_id] > 0:
            return False
        del self._refs[block_id]
        self._bytes_used -= self._sizes.pop(block_id)
        self._free_ids.append(block_id)
        return True

    def ref_count(self, block_id: int) -> int:
        return self._refs.get(block_id, 0)

    def size_of(self, block_id: int) -> int:
        self._check_live(block_id)
        return self._sizes[block_id]

    def live_ids(self) -> list[int]:
        return sorted(self._refs)

    def _check_live(self, block_id: int) -> None:
        if block_id not in self._refs:
            raise KeyError(f"block {block_id} is not allocated")

    def check_integrity(self) -> None:
        """Raise ``AssertionError`` if the books do not balance."""
        live = set(self._refs)
        free = set(self._free_ids)
        assert len(free) == len(self._free_ids), "a block id is twice in the free list"
        assert not live & free, f"blocks both live and free: {sorted(live & free)}"
        assert live | free == set(range(self._next_id)), "a block id is neither live nor free"
        assert set(self._sizes) == live, "sizes are not tracked for exactly the live blocks"
        assert all(count > 0 for count in self._refs.values()), "a live block has no reference"
        assert self._bytes_used == sum(self._sizes.values()), "bytes_used does not match the block sizes"
        assert self.budget is None or self._bytes_used <= self.budget, "bytes_used exceeds the budget"
