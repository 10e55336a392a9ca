"""``PrefixCache``: full KV blocks shared among the sequences of one LLM, found by chained hash.

After every forward, each newly completed block of a sequence is published: its hash (see
``hashing``) names the pool block of every layer holding those tokens, and the index keeps them
alive after the request ends. A new sequence first adopts the longest run of leading blocks
already indexed — shared read-only, one more reference each — and computes only the rest.

Sliding-window layers (Gemma 3) hold only their window: a prefix of ``n`` blocks is reusable
when every sliding layer has the blocks covering its window before token ``n * block_size``.
Their blocks stay aligned to token blocks because a prefill chunk is at most the window (a
longer chunk would skip tokens and shift a sliding layer's blocks).

With a ``RedisTier`` and/or a ``DiskTier``, every published block is also written to them after
the request (and before the pool evicts it, if sooner); a prefix missing from RAM is read back —
from Redis first (pipelined), then from disk — into the pool, so another process or a later one
skips the prefill too. A damaged block, or one another model wrote, is a miss (recomputed).

Which policies can share: none, or a quantizer alone (blocks are published once quantized).
Eviction rewrites a layer's blocks in place and depends on the sequence's own history, so
policies with a scorer, merging, head budgets or mixed precision do not share prefixes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kvmem.compress.policy import Policy
from kvmem.errors import KVBudgetError, KVMemError
from kvmem.kv.pool import KVPool
from kvmem.model.cache import KVMemCache
from kvmem.prefix.hashing import block_hashes, root_hash
from kvmem.prefix.index import Entry, PrefixIndex
from kvmem.tiers.disk import DiskTier
from kvmem.tiers.redis import RedisTier


class PrefixSharingError(KVMemError, ValueError):
    """A policy whose blocks cannot be shared was asked to share them."""


def can_share(policy: Policy | None) -> bool:
    return policy is None or policy.shares_prefix


@dataclass
class PrefixState:
    """One sequence's place in the hash chain: the hashes of its blocks published or adopted."""

    root: bytes
    policy: str  # the policy's name ("" for none), written with its blocks
    hashes: list[bytes] = field(default_factory=list)
    reused_tokens: int = 0
    disk_tokens: int = 0  # of the reused tokens, those read back from the disk tier
    redis_tokens: int = 0  # of the reused tokens, those read back from the Redis tier


class PrefixCache:
    """The prefix index of one pool, for one model. Implements the pool's ``Reclaimer``.

    Sequences of several policies may share it: the policy is part of every chain's root, so
    blocks of one policy are never adopted by a sequence of another.
    """

    def __init__(
        self,
        pool: KVPool,
        model_identity: str,
        disk: DiskTier | None = None,
        redis: RedisTier | None = None,
    ) -> None:
        self.pool = pool
        self.index = PrefixIndex(pool.manager, pool.incref, pool.decref, on_evict=self._spill)
        self.model_identity = model_identity
        self.disk = disk
        self.redis = redis
        self._unsaved: dict[bytes, str] = {}  # published, not yet in the tiers (insertion order): its policy
        pool.set_reclaimer(self)

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    def state(self, salt: str | None = None, policy: Policy | None = None) -> PrefixState:
        """Where a new sequence of ``policy`` (tenant ``salt``) starts its chain; raises
        ``PrefixSharingError`` for a policy whose blocks cannot be shared."""
        if not can_share(policy):
            assert policy is not None
            raise PrefixSharingError(
                f"policy {policy.name!r} evicts or reshapes blocks per sequence; prefix sharing works "
                "with no policy or a quantizer alone (kivi4, bfp4, …)"
            )
        name = None if policy is None else policy.name
        return PrefixState(root_hash(self.model_identity, name, self.block_size, salt), name or "")

    # --- the pool's Reclaimer
    def reclaimable(self) -> int:
        return self.index.reclaimable()

    def reclaim(self, nbytes: int) -> int:
        return self.index.reclaim(nbytes)

    # --- sequences
    def attach(self, cache: KVMemCache, token_ids: list[int], state: PrefixState, align: int = 1) -> int:
        """Adopt the longest indexed prefix of ``token_ids`` into the empty ``cache``; tokens reused.

        At least the last token is left to compute (its logits start the generation). The tokens
        reused are a multiple of ``align`` (and of the block size): with ``align`` the prefill
        chunk, what is left is computed in the very chunks a cold run computes it in, so the
        matrix kernels see the same shapes and round the same way (in bfloat16 on CPUs with AMX
        they round differently for different chunk lengths, and greedy tokens then drift).
        """
        assert cache.num_tokens == 0 and not state.hashes
        bs = self.block_size
        step = math.lcm(bs, max(1, align)) // bs  # blocks per reusable stride
        usable = (len(token_ids) - 1) // bs // step * step
        keys = block_hashes(state.root, token_ids[: usable * bs], bs)
        entries = self.index.match(keys)
        # Pinned (one extra reference) until adopted: reading blocks back from disk may make the
        # pool reclaim room, and it must not take the blocks this sequence is about to use.
        pinned = [b for e in entries for b in e.block_ids()]
        for block_id in pinned:
            self.pool.incref(block_id)
        try:
            in_ram = len(entries)
            from_tiers, sources = self._read_back(cache, keys[in_ram:], in_ram)
            pinned += [b for e in from_tiers for b in e.block_ids()]  # still hold their load reference
            entries += from_tiers
            n = self._reusable(cache, entries, step)
            for i, layer in enumerate(cache.kv_layers):
                if n == 0:
                    break
                first = 0 if layer.keep is None else max(0, n * bs - layer.keep) // bs
                ids = [e.blocks[i] for e in entries[first:n]]
                layer.stream().adopt([b for b in ids if b is not None], first * bs, n * bs)
                layer.is_initialized = True
        finally:
            for block_id in pinned:
                self.pool.decref(block_id)
        if n == 0:
            return 0
        state.hashes = [e.key for e in entries[:n]]
        self.index.touch(state.hashes)
        state.reused_tokens = n * bs
        used = sources[: max(0, n - in_ram)]
        state.disk_tokens = used.count("disk") * bs
        state.redis_tokens = used.count("redis") * bs
        return n * bs

    def _read_back(self, cache: KVMemCache, keys: list[bytes], depth: int) -> tuple[list[Entry], list[str]]:
        """Load the blocks of ``keys`` (leading ones first) from Redis or disk into the pool and the
        index, and which tier each came from; each loaded block keeps one extra reference for the
        caller to drop."""
        loaded: list[Entry] = []
        sources: list[str] = []
        if (self.disk is None and self.redis is None) or not keys:
            return loaded, sources
        expect = {"model": self.model_identity}
        remote = self.redis.get_many(keys, expect) if self.redis is not None else [None] * len(keys)
        for j, (key, found) in enumerate(zip(keys, remote), depth):
            source = "redis"
            if found is None and self.disk is not None:
                found, source = self.disk.get(key, expect), "disk"
            if found is None:
                break
            blocks = self._to_pool(cache, found[0])
            if blocks is None:  # no room in the pool, or a block of another shape: recompute
                break
            # the load's own reference stays as a pin (see attach)
            if not self.index.insert(key, j, blocks):  # indexed meanwhile: pin that entry instead
                for block_id in blocks:
                    if block_id is not None:
                        self.pool.decref(block_id)
                indexed = self.index.get(key)
                assert indexed is not None
                for block_id in indexed.block_ids():
                    self.pool.incref(block_id)
            entry = self.index.get(key)
            assert entry is not None
            loaded.append(entry)
            sources.append(source)
        return loaded, sources

    def _to_pool(self, cache: KVMemCache, tensors: dict[str, torch.Tensor]) -> list[int | None] | None:
        """Copy a block file's tensors into new pool blocks (one per layer present)."""
        blocks: list[int | None] = []
        try:
            for i, kv_layer in enumerate(cache.kv_layers):
                layer = kv_layer.stream()
                stored = tensors.get(f"layer.{i}")
                if stored is None:
                    blocks.append(None)
                    continue
                if stored.dtype == torch.uint8 and layer.layout is not None:
                    if stored.numel() != layer.layout.nbytes:
                        raise ValueError("packed block of another size")
                    block_id = self.pool.allocate_raw(stored.numel(), layer.device)
                else:
                    shape = (2, layer.num_heads, self.block_size, layer.head_dim)
                    if tuple(stored.shape) != shape or stored.dtype != layer.dtype:
                        raise ValueError("block of another shape")
                    block_id = self.pool.allocate(layer.num_heads, layer.head_dim, layer.dtype, layer.device)
                blocks.append(block_id)
                self.pool.tensor(block_id).copy_(stored)
        except (KVBudgetError, ValueError):
            for held in blocks:
                if held is not None:
                    self.pool.decref(held)
            return None
        return blocks

    def _reusable(self, cache: KVMemCache, entries: list[Entry], step: int = 1) -> int:
        """The most leading entries, a multiple of ``step``, every layer can be rebuilt from (a
        sliding layer needs the blocks of its window before that point, which moves with it)."""
        bs = self.block_size
        for n in range(len(entries) // step * step, 0, -step):
            complete = True
            for i, layer in enumerate(cache.kv_layers):
                first = 0 if layer.keep is None else max(0, n * bs - layer.keep) // bs
                if any(e.blocks[i] is None for e in entries[first:n]):
                    complete = False
                    break
            if complete:
                return n
        return 0

    def publish(self, cache: KVMemCache, token_ids: list[int], state: PrefixState) -> None:
        """Index every block of the cache completed since the last call (only final blocks:
        full, and quantized where the policy quantizes)."""
        bs = self.block_size
        done = len(state.hashes)
        full = cache.num_tokens // bs
        if full <= done:
            return
        previous = state.hashes[-1] if state.hashes else None
        views = _layer_views(cache)  # the tables do not change while blocks are published
        for j, key in enumerate(block_hashes(state.root, token_ids[: full * bs], bs, done, previous), done):
            blocks = [_block_of(view, j, bs) for view in views]
            if _NOT_FINAL in blocks:  # the quantizer's residual block: published once quantized
                return
            if self.index.insert(key, j, blocks) and (
                self.redis is not None or (self.disk is not None and key not in self.disk)
            ):
                self._unsaved[key] = state.policy
            state.hashes.append(key)
        # the chain is as recent as its newest block: under pressure it is cut from its end
        self.index.touch(state.hashes)

    def flush(self) -> int:
        """Write every published block not yet in the tiers (to Redis in one pipeline); blocks written."""
        entries = [e for e in (self.index.get(k) for k in self._unsaved) if e is not None]
        self._write([self._stored(e) for e in entries])
        self._unsaved.clear()
        return len(entries)

    def _stored(self, entry: Entry) -> tuple[bytes, dict[str, torch.Tensor], dict[str, str]]:
        """An entry as a stored block: key, every layer's pool block, header fields."""
        tensors = {f"layer.{i}": self.pool.tensor(b) for i, b in enumerate(entry.blocks) if b is not None}
        meta = {"depth": str(entry.depth), "policy": self._unsaved[entry.key], "model": self.model_identity}
        return entry.key, tensors, meta

    def _spill(self, entry: Entry) -> None:
        """Write an entry to the tiers if it is not there yet (before the pool frees it)."""
        if entry.key not in self._unsaved:
            return
        self._write([self._stored(entry)])
        self._unsaved.pop(entry.key)

    def _write(self, stored: list[tuple[bytes, dict[str, torch.Tensor], dict[str, str]]]) -> None:
        """Stored blocks to Redis (one pipeline) and to disk (those not there yet)."""
        if self.redis is not None and stored:
            self.redis.put_many(stored)
        if self.disk is None:
            return
        for key, tensors, meta in stored:
            if key in self.disk:
                continue
            try:
                self.disk.put(key, tensors, meta)
            except OSError as exc:  # a full or read-only disk costs a later recomputation, never this request
                self.disk.write_failed(exc)

    def clear(self) -> None:
        """Drop every cached block from RAM (the disk tier keeps what was written)."""
        self._unsaved.clear()
        self.index.clear()

    def check_integrity(self) -> None:
        self.index.check_integrity()


def _layer_views(cache: KVMemCache) -> list[tuple[list[int], int, bool, bool]]:
    """Per layer: (block ids, start, whether its blocks are token-aligned, whether it quantizes)."""
    views = []
    for layer in cache.kv_layers:
        stream = layer.stream()
        table = stream.table
        views.append(
            (table.block_ids, table.start, table.start % table.block_size == 0, stream.fmt is not None)
        )
    return views


_NOT_FINAL = -1


def _block_of(view: tuple[list[int], int, bool, bool], j: int, bs: int) -> int | None:
    """Layer's pool block for token block ``j``: its id, None (not held), or ``_NOT_FINAL``."""
    block_ids, start, aligned, quantizes = view
    i = j - start // bs
    if not aligned or i < 0 or i >= len(block_ids):
        return None
    if quantizes and i == len(block_ids) - 1:
        return _NOT_FINAL  # the last block is the full-precision residual until the next one starts
    return block_ids[i]
