"""``OffloadLayer``: a full-attention layer whose old blocks live outside RAM (see ``compress.offload``).

RAM (the pool) holds the sink blocks, the recent blocks, one summary per offloaded block and a
few fetched blocks; ``nbytes`` counts all of them. ``retrieve`` is called by kvmem's attention
with the layer's queries and returns the keys and values of the blocks to attend to besides the
resident ones. The layer never opens a file itself: it is given a ``BlockStore`` (the engine
gives it a folder of the disk tier's checked files). Offloaded blocks are written once and never
change, so a copy of the layer (a forked sequence) shares them through the store.

With a block format (``fmt``: KIVI, rotated, …) every full block is held, offloaded, stored and
fetched back as its packed bytes (decoded only for attention and for its summary), and with a
``residual`` format the block being filled is bytes too: the resident floor and every fetched
block cost the format's bytes, not the model dtype's.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import ClassVar, Protocol

import torch

from kvmem.errors import CorruptCacheError, KVBudgetError
from kvmem.kv.pool import KVPool
from kvmem.model.layers.base import LayerParams
from kvmem.model.layers.listed import ListLayer

# What makes an offloading layer fit: its floor is whole blocks (sinks, recent, the one being
# filled, one fetched) whatever the context; only the summaries grow with it (1.6% of a block each).
FLOOR_ADVICE = (
    "the floor is about 7 blocks a layer whatever the prompt, so a shorter prompt or fewer new tokens "
    "barely help: raise the KV budget (kv_budget= / --kv-budget), or shrink the blocks with a block "
    "format (offload+rotk4v2+res8: about a ninth), a smaller block_size (--block-size) or "
    "dtype bfloat16 (--dtype)"
)


class BlockStore(Protocol):
    """Where an offloading layer puts blocks it no longer keeps in RAM, shared by a sequence's forks."""

    @property
    def where(self) -> str:
        """For messages: the folder, or whatever holds the blocks."""
        ...

    def put(self, key: bytes, tensors: dict[str, torch.Tensor]) -> None: ...

    def get(self, key: bytes) -> dict[str, torch.Tensor] | None:
        """The tensors stored under ``key``; None when missing or damaged."""
        ...

    def share(self) -> None:
        """One more user (a fork of the sequence)."""
        ...

    def release(self) -> None:
        """One user fewer; the last one's release deletes the blocks."""
        ...


def quest_bounds(query: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
    """Upper bounds of every block's largest attention logit (before scaling): [N].

    query: [Hq, q, D]; summaries: [N, 2, H, D] (per-channel key minimum and maximum per KV head).
    For any key k inside a block's box, q . k <= sum_d max(q_d * min_d, q_d * max_d) (Quest).
    """
    heads = summaries.shape[2]
    hq, q, d = query.shape
    qg = query.reshape(heads, (hq // heads) * q, d).float()  # [H, G*q, D]: a KV head's queries
    low, high = summaries[:, 0], summaries[:, 1]  # [N, H, D]
    bound = torch.einsum("hgd,nhd->nhg", qg.clamp(min=0), high) + torch.einsum(
        "hgd,nhd->nhg", qg.clamp(max=0), low
    )  # [N, H, G*q]
    return bound.amax(dim=(1, 2))


class OffloadLayer(ListLayer):
    """``sinks`` leading and ``recent`` trailing full blocks (plus the partly filled one) stay in
    RAM; after each forward every other block goes to ``store``, leaving its Quest summary."""

    kind: ClassVar[str] = "offload"

    def __init__(
        self, params: LayerParams, store: BlockStore | None = None, sinks: int = 1, recent: int = 2
    ) -> None:
        assert params.window is None and store is not None, (
            "offload is for full-attention layers, given a store"
        )
        super().__init__(params)
        self.store = store
        self.sinks, self.recent = sinks, recent
        self.room: int | None = None  # bytes this layer may hold in RAM (None: no limit)
        self._tag = torch.randint(0, 2**62, (1,)).item()  # names this layer's files apart from forks'
        self._files: list[bytes] = []  # store keys of the offloaded blocks, in position order
        self._summaries: list[int] = []  # pool blocks of [2, H, D] float32: key minimum and maximum
        self._fetched: OrderedDict[int, int] = OrderedDict()  # offloaded index -> pool block, LRU first
        self.reads = 0  # blocks read back from the store

    @property
    def resident_blocks(self) -> int:
        """Most blocks held in RAM during a forward (sinks, recent, partial, a chunk of ``recent``)."""
        return self.sinks + 2 * self.recent + 1

    @property
    def packed(self) -> bool:
        """Whether full blocks are a block format's bytes (else keys and values in the model dtype)."""
        return self.blocks.layout is not None

    @property
    def num_offloaded(self) -> int:
        return len(self._files)

    @property
    def block_bytes(self) -> int:
        """Bytes of a full block as held, offloaded and fetched: packed, or in the model dtype."""
        return self.blocks.layout.nbytes if self.packed else self.blocks.block_bytes

    def _resident_bytes(self, blocks: int) -> int:
        """Most bytes of ``blocks`` resident blocks, the last being filled (in its residual format,
        or full precision), plus, with a block format, one block being encoded beside it."""
        if blocks == 0:
            return 0
        extra = self.block_bytes if self.packed else 0
        return (blocks - 1) * self.block_bytes + self.blocks.residual_bytes + extra

    @property
    def summary_bytes(self) -> int:
        return 2 * self.num_heads * self.head_dim * 4

    @property
    def nbytes(self) -> int:
        size = self.pool.manager.size_of
        return (
            self.blocks.nbytes
            + sum(size(b) for b in self._summaries)
            + sum(size(b) for b in self._fetched.values())
        )

    def set_room(self, room: int | None) -> None:
        self.room = room

    def min_bytes(self, tokens: int) -> int:
        """RAM the layer needs to serve ``tokens`` in all: resident blocks, every summary, one fetch."""
        blocks = -(-tokens // self.blocks.block_size)
        return self._resident_bytes(self.resident_blocks) + self.block_bytes + blocks * self.summary_bytes

    def _capacity(self, resident_blocks: int) -> int:
        """Blocks that may be cached as fetched while ``resident_blocks`` are held."""
        if self.room is None:
            return self.num_offloaded
        used = self._resident_bytes(resident_blocks) + len(self._summaries) * self.summary_bytes
        return max(0, (self.room - used) // self.block_bytes)

    def _shrink(self, capacity: int, keep: frozenset[int] = frozenset()) -> None:
        for index in [i for i in self._fetched if i not in keep]:
            if len(self._fetched) <= capacity:
                break
            self.pool.decref(self._fetched.pop(index))

    def before_forward(self, q: int) -> None:
        """Refuse if the room cannot serve the sequence that long (``KVBudgetError``, nothing
        allocated); drop fetched blocks the new tokens need room for."""
        tokens = self.seq_length + q
        if self.room is not None and self.min_bytes(tokens) > self.room:
            raise KVBudgetError(
                self.min_bytes(tokens),
                self.room,
                self.room,
                what=f"offload: layer {self.layer_idx} serving {tokens} tokens (resident blocks, a "
                "summary per block, a fetch)",
                advice=FLOOR_ADVICE,
            )
        after = self.blocks.table.plan_append(q, None).blocks_after
        self._shrink(self._capacity(after))

    def after_forward(self) -> None:
        """Every block but the sinks and the recent ones goes to the store."""
        table, bs = self.blocks.table, self.blocks.block_size
        tail = self.recent + (0 if table.last_fill == bs else 1)
        while len(table.block_ids) > self.sinks + tail:
            i = self.sinks
            block = self.pool.tensor(table.block_ids[i])  # [2, H, bs, D], or packed bytes
            keys = self._decode([block])[0]  # [H, bs, D]
            box = torch.stack([keys.amin(dim=1), keys.amax(dim=1)]).float()  # [2, H, D]
            key = hashlib.blake2b(f"{self._tag}:{len(self._files)}".encode(), digest_size=16).digest()
            self.store.put(key, {"block": block})
            self.blocks.drop_block(i)
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
        capacity = min(self._capacity(len(self.blocks.table.block_ids)), self.num_offloaded)
        if capacity < 1:
            raise KVBudgetError(
                self.block_bytes, 0, self.room, what=f"layer {self.layer_idx}'s offloaded retrieval"
            )
        bounds = quest_bounds(query[0].detach(), self._summary_stack())  # [N]
        chosen = sorted(torch.topk(bounds, capacity).indices.tolist())
        self._shrink(capacity - sum(1 for i in chosen if i not in self._fetched), frozenset(chosen))
        keys, values = self._decode([self.pool.tensor(self._fetch(i)) for i in chosen])  # [H, k*bs, D]
        return keys.unsqueeze(0), values.unsqueeze(0)

    def _decode(self, blocks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Full blocks as held (each [2, H, bs, D], or packed bytes) -> keys, values [H, n*bs, D]."""
        if not self.packed:
            return torch.cat([b[0] for b in blocks], dim=1), torch.cat([b[1] for b in blocks], dim=1)
        fmt, layout = self.blocks.fmt, self.blocks.layout
        assert fmt is not None
        keys, values = fmt.decode(torch.stack(blocks), layout, self.dtype)  # [N, H, bs, D]
        h, d = self.num_heads, self.head_dim
        keys, values = keys.transpose(0, 1).reshape(h, -1, d), values.transpose(0, 1).reshape(h, -1, d)
        return keys.contiguous(), values.contiguous()  # token-major rows, as attention reads them

    def _fetch(self, index: int) -> int:
        if index in self._fetched:
            self._fetched.move_to_end(index)
            return self._fetched[index]
        found = self.store.get(self._files[index])
        stored = None if found is None else found.get("block")
        expected = torch.uint8 if self.packed else self.dtype
        size = 0 if stored is None else stored.numel() * stored.element_size()
        if stored is None or stored.dtype != expected or size != self.block_bytes:
            raise CorruptCacheError(
                f"offloaded KV block {index} of layer {self.layer_idx} is missing or damaged in "
                f"{self.store.where}; it cannot be recomputed within this request"
            )
        if self.packed:
            block_id = self.pool.allocate_raw(self.block_bytes, self.device)
        else:
            block_id = self.pool.allocate(self.num_heads, self.head_dim, self.dtype, self.device)
        self.pool.tensor(block_id).copy_(stored)
        self._fetched[index] = block_id
        self.reads += 1
        return block_id

    def check(self) -> None:
        super().check()
        assert len(self._files) == len(self._summaries)
        assert all(0 <= i < len(self._files) for i in self._fetched)

    def copy_to(self, pool: KVPool) -> OffloadLayer:
        new = super().copy_to(pool)
        new._tag = torch.randint(0, 2**62, (1,)).item()
        new._files = list(self._files)  # the files never change: shared through the store (the cache
        # counts its users)
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
