"""``PrefixCache``: full KV blocks shared among the sequences of one LLM, found by chained hash.

After every forward, each newly completed block of a sequence is published: its hash (see
``hashing``) names the pool block of every layer holding those tokens, and the index keeps them
alive after the request ends. A new sequence first adopts the longest run of leading blocks
already indexed — shared read-only, one more reference each — and computes only the rest.

Sliding-window layers (Gemma 3) hold only their window: a prefix of ``n`` blocks is reusable
when every sliding layer has the blocks covering its window before token ``n * block_size``.
Their blocks stay aligned to token blocks because a prefill chunk is at most the window (a
longer chunk would skip tokens and shift a sliding layer's blocks).

Which policies can share: none, or a quantizer alone (blocks are published once quantized).
Eviction rewrites a layer's blocks in place and depends on the sequence's own history, so
policies with a scorer, merging, head budgets or mixed precision do not share prefixes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmem.compress.policy import Policy
from kvmem.errors import KVMemError
from kvmem.kv.pool import KVPool
from kvmem.model.cache import KVMemCache
from kvmem.prefix.hashing import block_hashes, root_hash
from kvmem.prefix.index import Entry, PrefixIndex


class PrefixSharingError(KVMemError, ValueError):
    """A policy whose blocks cannot be shared was asked to share them."""


def can_share(policy: Policy | None) -> bool:
    return policy is None or (
        policy.scorer is None and policy.heads is None and policy.mixed is None and policy.merge is None
    )


@dataclass
class PrefixState:
    """One sequence's place in the hash chain: the hashes of its blocks published or adopted."""

    root: bytes
    hashes: list[bytes] = field(default_factory=list)
    reused_tokens: int = 0


class PrefixCache:
    """The prefix index of one pool, for one model and policy. Implements the pool's ``Reclaimer``."""

    def __init__(
        self, pool: KVPool, model_identity: str, policy_name: str | None, policy: Policy | None
    ) -> None:
        if not can_share(policy):
            raise PrefixSharingError(
                f"policy {policy_name!r} evicts or reshapes blocks per sequence; prefix sharing works "
                "with no policy or a quantizer alone (kivi4, bfp4, …)"
            )
        self.pool = pool
        self.index = PrefixIndex(pool.manager, pool.incref, pool.decref)
        self.model_identity = model_identity
        self.policy_name = policy_name
        pool.set_reclaimer(self)

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    def state(self, salt: str | None = None) -> PrefixState:
        return PrefixState(root_hash(self.model_identity, self.policy_name, self.block_size, salt))

    # --- the pool's Reclaimer
    def reclaimable(self) -> int:
        return self.index.reclaimable()

    def reclaim(self, nbytes: int) -> int:
        return self.index.reclaim(nbytes)

    # --- sequences
    def attach(self, cache: KVMemCache, token_ids: list[int], state: PrefixState) -> int:
        """Adopt the longest indexed prefix of ``token_ids`` into the empty ``cache``; tokens reused.

        At least the last token is left to compute (its logits start the generation).
        """
        assert cache.num_tokens == 0 and not state.hashes
        bs = self.block_size
        usable = (len(token_ids) - 1) // bs
        entries = self.index.match(block_hashes(state.root, token_ids[: usable * bs], bs))
        n = self._reusable(cache, entries)
        if n == 0:
            return 0
        for i, layer in enumerate(cache.paged_layers):
            first = 0 if layer.keep is None else max(0, n * bs - layer.keep) // bs
            ids = [e.blocks[i] for e in entries[first:n]]
            layer.adopt([b for b in ids if b is not None], first * bs, n * bs)
        state.hashes = [e.key for e in entries[:n]]
        state.reused_tokens = n * bs
        return n * bs

    def _reusable(self, cache: KVMemCache, entries: list[Entry]) -> int:
        """The most leading entries every layer can be rebuilt from."""
        bs = self.block_size
        for n in range(len(entries), 0, -1):
            complete = True
            for i, layer in enumerate(cache.paged_layers):
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
        for j, key in enumerate(block_hashes(state.root, token_ids[: full * bs], bs, done, previous), done):
            blocks = [_block_of(view, j, bs) for view in _layer_views(cache)]
            if _NOT_FINAL in blocks:  # the quantizer's residual block: published once quantized
                return
            self.index.insert(key, j, blocks)
            state.hashes.append(key)

    def clear(self) -> None:
        self.index.clear()

    def check_integrity(self) -> None:
        self.index.check_integrity()


def _layer_views(cache: KVMemCache) -> list[tuple[list[int], int, bool, bool]]:
    """Per layer: (block ids, start, whether its blocks are token-aligned, whether it quantizes)."""
    views = []
    for layer in cache.paged_layers:
        table = layer.table
        views.append(
            (table.block_ids, table.start, table.start % table.block_size == 0, layer.quant is not None)
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
