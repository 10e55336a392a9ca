"""kvmem's transformers ``Cache``: every key and value of one sequence lives in blocks of the ``KVPool``.

This is the public extension point transformers offers (a ``Cache`` made of ``CacheLayerMixin``
layers), so a ``KVMemCache`` also works as a plain cache with any decoder that takes one (batch
size 1). kvmem's own engine runs many of them in one forward instead (``kvmem.model.batch``).

The layers are built from ``LayerSpec``s (``kvmem.model.layers``): by default a paged layer for
each full-attention layer and a sliding layer for each sliding-window one; a compression policy
hands other specs (quantized blocks, per-head storage, mixed precision, offloading).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache

from kvmem.kv.pool import KVPool
from kvmem.model.layers import BlockStore, KVLayer, LayerSpec, build_layer, default_spec
from kvmem.model.spec import ModelSpec


class KVMemCache(Cache):
    """The cache of one sequence: one ``KVLayer`` per model layer, all in ``pool``.

    ``store`` is where offloading layers put their old blocks (shared with forks, released with
    the last of them). ``byte_budget`` is the bytes this sequence's compression policy may hold
    (its share of the pool; None: the policy's own budget).
    """

    def __init__(
        self,
        pool: KVPool,
        spec: ModelSpec,
        layers: Sequence[LayerSpec] | None = None,
        device: torch.device | None = None,
        store: BlockStore | None = None,
    ) -> None:
        self.pool = pool
        self.spec = spec
        self.device = device if device is not None else torch.device("cpu")
        specs = list(layers) if layers is not None else [default_spec(w) for w in spec.windows]
        if len(specs) != spec.num_layers:
            raise ValueError(f"{len(specs)} layer specs for a model of {spec.num_layers} layers")
        self.store = store
        built = [
            build_layer(s, pool, spec.num_kv_heads, spec.head_dim, spec.dtype, i, w, self.device, store)
            for i, (s, w) in enumerate(zip(specs, spec.windows))
        ]
        super().__init__(layers=built)  # type: ignore[arg-type]
        self.layer_weights: list[float] | None = None  # a compression policy's per-layer shares
        self.byte_budget: int | None = None

    @property
    def kv_layers(self) -> list[KVLayer]:
        return self.layers  # type: ignore[return-value]

    @property
    def num_tokens(self) -> int:
        """Tokens of the sequence the cache has seen (its length)."""
        return self.get_seq_length()

    @property
    def tokens_held(self) -> int:
        """Tokens whose keys and values the pool holds, per layer on average (rounded): fewer than
        ``num_tokens`` once tokens are evicted or leave a sliding window (or an offloading layer's
        blocks are on disk)."""
        layers = self.kv_layers
        return round(sum(layer.tokens_held for layer in layers) / len(layers)) if layers else 0

    @property
    def nbytes(self) -> int:
        """Bytes of pool blocks this sequence holds."""
        return sum(layer.nbytes for layer in self.kv_layers)

    def bytes_needed(self, q: int) -> int:
        """Extra bytes the pool must have free to append ``q`` tokens to every layer.

        Layers run in order and a sliding layer frees its expired blocks before it allocates, so
        the peak is the largest of (layers done: after, layers to come: before) over the forward.
        """
        sizes = [layer.bytes_to_append(q) for layer in self.kv_layers]
        now = sum(before for before, _ in sizes)
        peak, running = now, now
        for before, after in sizes:
            running += after - before
            peak = max(peak, running)
        return peak - now

    def bytes_to_grow(self, n: int) -> int:
        """Extra bytes that always suffice for ``n`` more tokens, whatever the chunking."""
        return sum(layer.max_bytes_to_grow(n) for layer in self.kv_layers) - self.nbytes

    def check(self) -> None:
        for layer in self.kv_layers:
            layer.check()

    def copy_to(self, pool: KVPool) -> KVMemCache:
        """An independent copy of this cache in ``pool`` (e.g. to branch a sequence)."""
        new = copy.copy(self)
        new.pool = pool
        new.layers = [layer.copy_to(pool) for layer in self.kv_layers]
        new.layer_weights = None if self.layer_weights is None else list(self.layer_weights)
        if self.store is not None:  # offloaded blocks never change: the copy shares them
            self.store.share()
        return new

    def release(self) -> None:
        for layer in self.kv_layers:
            layer.release()
        if self.store is not None:
            self.store.release()
            self.store = None
