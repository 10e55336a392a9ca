"""``OffloadLayer``: a full-attention layer whose old blocks live on disk (see ``compress.offload``).

RAM (the pool) holds the sink blocks, the recent blocks, one summary per offloaded block and a
few fetched blocks; ``nbytes`` counts all of them. ``retrieve`` is called by kvmem's attention
function with the layer's queries and returns the keys and values of the blocks to attend to
besides the resident ones. Offloaded blocks are written once and never change, so a copy of the
layer (a forked sequence) shares them: ``OffloadStore`` deletes its folder with its last user.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch

from kvmem.compress.offload import Offload, quest_bounds
from kvmem.errors import CorruptCacheError, KVBudgetError
from kvmem.kv.pool import KVPool
from kvmem.model.cache import PagedLayer
from kvmem.tiers.disk import DiskTier


class OffloadStore:
    """A folder of offloaded blocks shared by a sequence and its forks; removed with the last."""

    def __init__(self, parent: Path) -> None:
        parent.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="seq-", dir=parent))
        self.disk = DiskTier(self.folder)
        self.users = 1

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            shutil.rmtree(self.folder, ignore_errors=True)


class OffloadLayer(PagedLayer):
    def __init__(
        self,
        pool: KVPool,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        layer_idx: int,
        offload: Offload,
        store: OffloadStore,
    ) -> None:
        super().__init__(pool, num_heads, head_dim, None, dtype, layer_idx)
        self.plan = offload
        self.store = store
        self.room: int | None = None  # bytes this layer may hold in RAM (None: no limit)
        self._tag = torch.randint(0, 2**62, (1,)).item()  # names this layer's files apart from forks'
        self._files: list[bytes] = []  # store keys of the offloaded blocks, in position order
        self._summaries: list[int] = []  # pool blocks of [2, H, D] float32: key minimum and maximum
        self._fetched: OrderedDict[int, int] = OrderedDict()  # offloaded index -> pool block, LRU first
        self.reads = 0  # blocks read back from the store

    @property
    def num_offloaded(self) -> int:
        return len(self._files)

    @property
    def summary_bytes(self) -> int:
        return 2 * self.num_heads * self.head_dim * 4

    @property
    def nbytes(self) -> int:
        size = self.pool.manager.size_of
        return (
            super().nbytes
            + sum(size(b) for b in self._summaries)
            + sum(size(b) for b in self._fetched.values())
        )

    def min_bytes(self, tokens: int) -> int:
        """RAM the layer needs to serve ``tokens`` in all: resident blocks, every summary, one fetch."""
        blocks = -(-tokens // self.table.block_size)
        return (self.plan.resident_blocks + 1) * self.block_bytes + blocks * self.summary_bytes

    def _capacity(self, resident_blocks: int) -> int:
        """Blocks that may be cached as fetched while ``resident_blocks`` are held."""
        if self.room is None:
            return self.num_offloaded
        used = resident_blocks * self.block_bytes + len(self._summaries) * self.summary_bytes
        return max(0, (self.room - used) // self.block_bytes)

    def _shrink(self, capacity: int, keep: frozenset[int] = frozenset()) -> None:
        for index in [i for i in self._fetched if i not in keep]:
            if len(self._fetched) <= capacity:
                break
            self.pool.decref(self._fetched.pop(index))

    def prepare(self, q: int) -> None:
        """Before a forward of ``q`` tokens: refuse if the room cannot serve the sequence that long
        (``KVBudgetError``, nothing allocated); drop fetched blocks the new tokens need room for."""
        tokens = self.table.length + q
        if self.room is not None and self.min_bytes(tokens) > self.room:
            raise KVBudgetError(
                self.min_bytes(tokens),
                self.room,
                self.room,
                what=f"offload: layer {self.layer_idx} serving {tokens} tokens (resident blocks, a "
                "summary per block, a fetch)",
            )
        after = self.table.plan_append(q, None).blocks_after
        self._shrink(self._capacity(after))

    def offload_old(self) -> None:
        """After a forward: every block but the sinks and the recent ones goes to the store."""
        table, bs = self.table, self.table.block_size
        tail = self.plan.recent + (0 if table.last_fill == bs else 1)
        while len(table.block_ids) > self.plan.sinks + tail:
            i = self.plan.sinks
            block = self.pool.tensor(table.block_ids[i])  # [2, H, bs, D]
            box = torch.stack([block[0].amin(dim=1), block[0].amax(dim=1)]).float()  # [2, H, D]
            key = hashlib.blake2b(f"{self._tag}:{len(self._files)}".encode(), digest_size=16).digest()
            self.store.disk.put(key, {"block": block})
            self.drop_block(i)
            summary = self.pool.allocate_raw(self.summary_bytes, block.device)
            self.pool.tensor(summary).view(torch.float32).view(2, self.num_heads, self.head_dim).copy_(box)
            self._files.append(key)
            self._summaries.append(summary)

    def _summary_stack(self) -> torch.Tensor:
        """[N, 2, H, D]"""
        views = [self.pool.tensor(b).view(torch.float32) for b in self._summaries]
        return torch.stack(views).view(-1, 2, self.num_heads, self.head_dim)

    def retrieve(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys and values ([1, H, k * bs, D] each) of the offloaded blocks with the highest Quest
        bound for ``query`` ([1, Hq, q, D]), fetched into RAM as needed; None if none is offloaded."""
        if not self._files:
            return None
        capacity = min(self._capacity(len(self.table.block_ids)), self.num_offloaded)
        if capacity < 1:
            raise KVBudgetError(
                self.block_bytes, 0, self.room, what=f"layer {self.layer_idx}'s offloaded retrieval"
            )
        bounds = quest_bounds(query[0].detach(), self._summary_stack())  # [N]
        chosen = sorted(torch.topk(bounds, capacity).indices.tolist())
        self._shrink(capacity - sum(1 for i in chosen if i not in self._fetched), frozenset(chosen))
        blocks = [self.pool.tensor(self._fetch(i)) for i in chosen]  # each [2, H, bs, D]
        keys = torch.cat([b[0] for b in blocks], dim=1)
        values = torch.cat([b[1] for b in blocks], dim=1)
        return keys.unsqueeze(0), values.unsqueeze(0)

    def _fetch(self, index: int) -> int:
        if index in self._fetched:
            self._fetched.move_to_end(index)
            return self._fetched[index]
        found = self.store.disk.get(self._files[index])
        if found is None or "block" not in found[0]:
            raise CorruptCacheError(
                f"offloaded KV block {index} of layer {self.layer_idx} is missing or damaged in "
                f"{self.store.folder}; it cannot be recomputed within this request"
            )
        block_id = self.pool.allocate(self.num_heads, self.head_dim, self.dtype, self.device)
        self.pool.tensor(block_id).copy_(found[0]["block"])
        self._fetched[index] = block_id
        self.reads += 1
        return block_id

    def check(self) -> None:
        super().check()
        assert len(self._files) == len(self._summaries)
        assert all(0 <= i < len(self._files) for i in self._fetched)

    def copy_to(self, pool: KVPool) -> OffloadLayer:
        new = super().copy_to(pool)
        assert isinstance(new, OffloadLayer)
        new._tag = torch.randint(0, 2**62, (1,)).item()
        new._files = list(self._files)  # the files never change: shared through the store
        new._summaries = []
        for summary in self._summaries:
            copy_id = pool.allocate_raw(self.summary_bytes, self.device)
            pool.tensor(copy_id).copy_(self.pool.tensor(summary))
            new._summaries.append(copy_id)
        new._fetched = OrderedDict()  # fetched again as needed
        return new

    def release(self) -> None:
        super().release()
        for block_id in [*self._summaries, *self._fetched.values()]:
            self.pool.decref(block_id)
        self._summaries, self._fetched, self._files = [], OrderedDict(), []
