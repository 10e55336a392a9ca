"""``PrefixIndex``: which pool blocks hold which hashed token block, and LRU eviction. Plain Python.

An entry is one token block of every layer: ``blocks[layer]`` is the pool block holding those
tokens for that layer, or None when the layer did not keep them (a sliding-window layer's old
blocks). The index holds one reference on every block it names, so a cached block outlives the
request that computed it; it is released when the pool needs room and no sequence uses it.

Contract:
- ``insert`` takes a reference on each block; ``evict`` / ``clear`` drop them.
- ``reclaimable`` is exactly the bytes ``reclaim`` could free now: blocks referenced by the index
  alone. ``reclaim`` frees them from least recently used entries first (deeper blocks first among
  equals, so a chain is cut from its end) and never touches a block in use. Blocks go one by one:
  a sliding-window layer's old block is freed while the same entry's full-attention blocks are
  still in use (the entry then names None for that layer); an entry left with no block is dropped.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from kvmem.kv.blocks import BlockManager


@dataclass
class Entry:
    key: bytes
    depth: int  # block position in the sequence: tokens [depth * bs, (depth + 1) * bs)
    blocks: tuple[int | None, ...]  # per layer
    last_used: int

    def block_ids(self) -> list[int]:
        return [b for b in self.blocks if b is not None]


class PrefixIndex:
    def __init__(
        self,
        manager: BlockManager,
        incref: Callable[[int], object] | None = None,
        decref: Callable[[int], object] | None = None,
        on_evict: Callable[[Entry], object] | None = None,
    ) -> None:
        """``manager`` keeps the books; ``incref`` / ``decref`` (default: the manager's) are the
        pool's, so a block whose last reference is dropped also loses its tensor. ``on_evict`` sees
        each entry ``reclaim`` is about to free (a lower tier may keep a copy)."""
        self.manager = manager
        self._on_evict = on_evict
        self._incref = incref or manager.incref
        self._decref = decref or manager.decref
        self._entries: dict[bytes, Entry] = {}
        self._clock = itertools.count(1)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def get(self, key: bytes) -> Entry | None:
        return self._entries.get(key)

    def insert(self, key: bytes, depth: int, blocks: Sequence[int | None]) -> bool:
        """Name ``blocks`` by ``key``; False if the key was already there (then only the layers
        it had lost are filled in from ``blocks``)."""
        entry = self._entries.get(key)
        if entry is not None:
            filled = list(entry.blocks)
            for i, (old, new) in enumerate(zip(entry.blocks, blocks)):
                if old is None and new is not None:
                    self._incref(new)
                    filled[i] = new
            entry.blocks = tuple(filled)
            return False
        for block_id in blocks:
            if block_id is not None:
                self._incref(block_id)
        self._entries[key] = Entry(key, depth, tuple(blocks), next(self._clock))
        return True

    def match(self, keys: Iterable[bytes]) -> list[Entry]:
        """The entries of the longest run of leading ``keys`` that are all indexed; marks them used."""
        found: list[Entry] = []
        for key in keys:
            entry = self._entries.get(key)
            if entry is None:
                break
            found.append(entry)
        now = next(self._clock)
        for entry in found:
            entry.last_used = now
        return found

    def _unused(self, entry: Entry) -> list[int]:
        """The entry's blocks only the index references."""
        return [b for b in entry.block_ids() if self.manager.ref_count(b) == 1]

    def _nbytes(self, entry: Entry) -> int:
        return sum(self.manager.size_of(b) for b in entry.block_ids())

    @property
    def nbytes(self) -> int:
        """Bytes of every block the index names (some may be shared with live sequences)."""
        return sum(self._nbytes(e) for e in self._entries.values())

    def unused_blocks(self) -> list[int]:
        """Blocks the index alone references: cached, used by no sequence."""
        return [b for e in self._entries.values() for b in self._unused(e)]

    def reclaimable(self) -> int:
        return sum(self.manager.size_of(b) for b in self.unused_blocks())

    def touch(self, keys: Iterable[bytes]) -> None:
        """Mark these entries used now, together (a chain just published or adopted)."""
        now = next(self._clock)
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None:
                entry.last_used = now

    def reclaim(self, nbytes: int) -> int:
        """Free unused blocks, least recently used entries first, until ``nbytes`` are freed; bytes freed."""
        freed = 0
        for entry in sorted(self._entries.values(), key=lambda e: (e.last_used, -e.depth)):
            if freed >= nbytes:
                break
            unused = set(self._unused(entry))
            if not unused:
                continue
            if self._on_evict is not None:
                self._on_evict(entry)  # a lower tier may keep the whole entry first
            freed += sum(self.manager.size_of(b) for b in unused)
            entry.blocks = tuple(None if b in unused else b for b in entry.blocks)
            for block_id in unused:
                self._decref(block_id)
            if not entry.block_ids():
                del self._entries[entry.key]
        return freed

    def evict(self, key: bytes) -> None:
        entry = self._entries.pop(key)
        for block_id in entry.block_ids():
            self._decref(block_id)

    def clear(self) -> None:
        for key in list(self._entries):
            self.evict(key)

    def check_integrity(self) -> None:
        for entry in self._entries.values():
            for block_id in entry.block_ids():
                assert self.manager.ref_count(block_id) >= 1, f"indexed block {block_id} is not live"
