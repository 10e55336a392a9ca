"""The KV pool: one tensor per block, allocated on demand under the byte budget.

``BlockManager`` keeps the books; this module owns the tensors. Each block is one layer's keys
and values for ``block_size`` tokens, stored as one tensor ``[2, H, block_size, D]`` (0 = keys,
1 = values), so freeing a block really returns its memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from kvmem.kv.blocks import BlockManager
from kvmem.kv.budget import parse_budget

# Tokens per block. Attention reads a sequence's blocks with one concatenation per layer and
# step, whose cost grows with the number of blocks: on SmolLM2 at 2k tokens (2 CPU cores) the
# cache update took ~12 ms per decode step with 16-token blocks, ~8 ms with 64, ~6 ms with 128,
# against ~5 ms for transformers' DynamicCache. 64 keeps the overhead small and the slack (at
# most 63 unused token slots per layer) low.
DEFAULT_BLOCK_SIZE = 64


@dataclass(frozen=True)
class PoolConfig:
    """``budget`` in bytes (None: unlimited); ``block_size`` in tokens."""

    budget: int | None = None
    block_size: int = DEFAULT_BLOCK_SIZE

    def __post_init__(self) -> None:
        parse_budget(self.budget)  # validates: positive int or None
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")


def block_nbytes(num_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block: keys and values of ``block_size`` tokens for ``num_heads`` heads."""
    return 2 * num_heads * block_size * head_dim * torch.empty((), dtype=dtype).element_size()


class Reclaimer(Protocol):
    """Something holding blocks no sequence uses (a prefix cache) that it can give back on demand."""

    def reclaimable(self) -> int:
        """Bytes ``reclaim`` could free now."""
        ...

    def reclaim(self, nbytes: int) -> int:
        """Free at least ``nbytes`` if possible; return the bytes freed."""
        ...


class KVPool:
    """Blocks of KV tensors under a byte budget, shared by every sequence of one model.

    ``allocate`` raises ``KVBudgetError`` (and allocates nothing) when the budget would be exceeded.
    ``bytes_used`` equals the bytes of the tensors really held (see ``physical_nbytes``).
    """

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.manager = BlockManager(config.budget)
        self._tensors: dict[int, torch.Tensor] = {}
        self._reclaimer: Reclaimer | None = None

    def set_reclaimer(self, reclaimer: Reclaimer | None) -> None:
        """Blocks cached for reuse are given back by ``reclaimer`` when an allocation needs room."""
        self._reclaimer = reclaimer

    @property
    def bytes_available(self) -> int | None:
        """Bytes an allocation can have: free plus what the reclaimer can give back (None: unlimited)."""
        free = self.bytes_free
        if free is None or self._reclaimer is None:
            return free
        return free + self._reclaimer.reclaimable()

    def _make_room(self, nbytes: int) -> None:
        if self._reclaimer is not None and not self.manager.can_allocate(nbytes):
            free = self.bytes_free
            assert free is not None
            if free + self._reclaimer.reclaimable() >= nbytes:  # else keep the cache: it would not help
                self._reclaimer.reclaim(nbytes - free)

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def budget(self) -> int | None:
        return self.config.budget

    @property
    def bytes_used(self) -> int:
        return self.manager.bytes_used

    @property
    def bytes_free(self) -> int | None:
        return self.manager.bytes_free

    @property
    def num_blocks(self) -> int:
        return self.manager.num_blocks

    def allocate(self, num_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> int:
        nbytes = block_nbytes(num_heads, head_dim, self.block_size, dtype)
        self._make_room(nbytes)
        block_id = self.manager.allocate(nbytes)
        # block: [2, H, block_size, D]; zeroed, because attention reads whole blocks and masks the
        # unfilled slots, and uninitialised memory may hold NaNs that a mask does not cancel
        self._tensors[block_id] = torch.zeros(
            (2, num_heads, self.block_size, head_dim), dtype=dtype, device=device
        )
        return block_id

    def allocate_raw(self, nbytes: int, device: torch.device) -> int:
        """A block of ``nbytes`` plain bytes (uint8), for compressed layouts."""
        self._make_room(nbytes)
        block_id = self.manager.allocate(nbytes)
        self._tensors[block_id] = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return block_id

    def tensor(self, block_id: int) -> torch.Tensor:
        return self._tensors[block_id]

    def incref(self, block_id: int) -> None:
        self.manager.incref(block_id)

    def decref(self, block_id: int) -> None:
        if self.manager.decref(block_id):
            del self._tensors[block_id]

    def physical_nbytes(self) -> int:
        """Bytes of the storage behind every held tensor, measured on the tensors themselves."""
        return sum(t.untyped_storage().nbytes() for t in self._tensors.values())

    def check_integrity(self) -> None:
        self.manager.check_integrity()
        assert set(self._tensors) == set(self.manager.live_ids()), "tensors do not match live blocks"
        for block_id, tensor in self._tensors.items():
            assert tensor.untyped_storage().nbytes() == self.manager.size_of(block_id), (
                f"block {block_id} holds a different number of bytes than booked"
            )
        assert self.physical_nbytes() == self.bytes_used
