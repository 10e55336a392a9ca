"""A compression policy: a scorer, applied under a budget, before and after each forward.

- Byte budgets (and token budgets) give every full-attention layer a fixed capacity ``C``.
  Before a forward of ``q`` tokens, a layer that would exceed ``C`` evicts down to ``C - q``
  (a block's worth more, so decoding compacts once per block, not once per token). The pool
  therefore never holds more than the budget, at prefill or during decoding.
- Fraction budgets keep at most that share of the tokens seen, checked after each forward.

Sliding-window layers are never compressed: their window already bounds them. Eviction is
physical: kept tokens move to the front of the layer's blocks and the rest are freed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kvmem.compress.allocator import Allocator, Uniform
from kvmem.compress.budget import KVBudget
from kvmem.compress.heads import AdaKV
from kvmem.compress.merge import Merge
from kvmem.compress.mixed import MixedPrecision
from kvmem.compress.offload import Offload
from kvmem.compress.quantizer import Quantizer
from kvmem.compress.scorer import ScoreInputs, Scorer
from kvmem.errors import InvalidBudgetError, KVBudgetError
from kvmem.model.cache import KVMemCache, PagedLayer
from kvmem.model.mixed import MixedLayer
from kvmem.model.offload import OffloadLayer
from kvmem.model.ragged import RaggedLayer


@dataclass(frozen=True)
class Policy:
    """An eviction scorer, a quantizer, or both (``snapkv+kivi4``), under a budget.

    With no scorer nothing is evicted: the budget then refuses requests that do not fit, as
    without a policy, but counts the quantized block sizes.
    """

    scorer: Scorer | None
    budget: KVBudget
    quant: Quantizer | None = None
    allocator: Allocator = field(default_factory=Uniform)
    merge: Merge | None = None
    heads: AdaKV | None = None
    mixed: MixedPrecision | None = None
    offload: Offload | None = None

    def __post_init__(self) -> None:
        if self.offload is not None:
            others = (self.scorer, self.quant, self.merge, self.heads, self.mixed)
            if any(part is not None for part in others) or not isinstance(self.allocator, Uniform):
                raise ValueError("offload is a policy of its own: it combines with no other part")
            if self.budget.bytes is None:
                raise InvalidBudgetError("offload needs a KV budget in bytes: the RAM its layers may hold")
            return
        if self.scorer is None and self.quant is None:
            raise ValueError("a policy needs an eviction scorer, a quantizer, or both")
        if self.heads is not None and (self.scorer is None or not self.scorer.per_head):
            why = "it needs an eviction method" if self.scorer is None else "its scorer scores heads alike"
            raise ValueError(f"{self.heads.name} shares a layer's budget among heads by their scores; {why}")
        if self.heads is not None and self.merge is not None:
            raise ValueError(f"{self.heads.name} cannot be combined with merging")
        if self.mixed is not None:
            if self.scorer is None or self.heads is not None or self.merge is not None:
                raise ValueError("mixed precision needs an eviction method, and no adakv or merging")
            if self.budget.bytes is None and self.budget.tokens is None:
                raise InvalidBudgetError(
                    "mixed precision needs a KV budget in bytes or tokens (a % budget counts tokens, "
                    "and mixed precision keeps them all at one precision or another)"
                )
        if self.scorer is None and (self.budget.fraction is not None or self.budget.tokens is not None):
            raise InvalidBudgetError(
                "a KV budget in % or tokens needs an eviction method (quantization alone cannot drop tokens)"
            )

    @property
    def name(self) -> str:
        allocator = None if isinstance(self.allocator, Uniform) else self.allocator
        parts = (self.scorer, allocator, self.heads, self.mixed, self.merge, self.quant, self.offload)
        return "+".join(part.name for part in parts if part is not None)

    def capacities(self, cache: KVMemCache) -> dict[int, int] | None:
        """Tokens each full-attention layer may hold at most, by layer index (None: no fixed cap)."""
        if self.scorer is None or (self.budget.tokens is None and self.budget.bytes is None):
            return None
        full = _compressible(cache)
        weights = self.layer_weights(cache)
        if self.budget.tokens is not None:
            return {layer.layer_idx: max(1, round(self.budget.tokens * w)) for layer, w in zip(full, weights)}
        assert self.budget.bytes is not None
        sliding = [layer for layer in cache.paged_layers if layer.window is not None]
        fixed = sum(layer.max_bytes_to_grow(1 << 30) for layer in sliding)
        # a layer's cost is affine in its blocks: n * per_block + base
        per_block = [layer.cost_of_blocks(2) - layer.cost_of_blocks(1) for layer in full]
        base = sum(layer.cost_of_blocks(1) - p for layer, p in zip(full, per_block))
        room = self.budget.bytes - fixed - base
        if room < sum(per_block):  # not even one block per layer
            minimum = fixed + base + sum(per_block)
            raise KVBudgetError(minimum, self.budget.bytes, self.budget.bytes, what=f"policy {self.name}")
        unit = room / sum(w * p for w, p in zip(weights, per_block))
        blocks = [max(1, int(w * unit)) for w in weights]
        # every layer keeps at least one block; take what that costs from the largest shares
        while sum(n * p for n, p in zip(blocks, per_block)) > room:
            largest = max(range(len(blocks)), key=lambda i: blocks[i])
            blocks[largest] -= 1
        return {layer.layer_idx: n * cache.pool.block_size for layer, n in zip(full, blocks)}

    def layer_weights(self, cache: KVMemCache) -> list[float]:
        """The allocator's shares for this sequence; measured ones are kept on the cache."""
        if cache.layer_weights is not None:
            return cache.layer_weights
        full = _compressible(cache)
        weights = self.allocator.weights(full)
        if weights is None:
            return [1.0] * len(full)
        if self.allocator.query_window:  # measured from attention: fixed for the sequence
            cache.layer_weights = weights
        return weights

    def offload_room(self, cache: KVMemCache, others: int = 0) -> int:
        """Bytes each offloading layer may hold: the budget, less the sliding layers' and ``others``
        (what other sequences hold in the pool), shared evenly."""
        assert self.budget.bytes is not None
        sliding = [layer for layer in cache.paged_layers if layer.window is not None]
        fixed = sum(layer.max_bytes_to_grow(1 << 30) for layer in sliding)
        return max(0, self.budget.bytes - fixed - others) // max(1, len(cache.paged_layers) - len(sliding))

    def max_chunk(self, cache: KVMemCache) -> int | None:
        """The largest forward the policy can make room for (half the smallest capacity)."""
        if self.offload is not None:
            return self.offload.chunk(cache.pool.block_size)
        capacities = self.capacities(cache)
        return None if not capacities else max(1, min(capacities.values()) // 2)

    def before_forward(self, cache: KVMemCache, q: int) -> None:
        for layer in cache.paged_layers:
            if isinstance(layer, OffloadLayer):
                layer.prepare(q)
        capacities = self.capacities(cache)
        if not capacities:
            return
        for layer in _compressible(cache):
            capacity = capacities[layer.layer_idx]
            if q > capacity:
                raise ValueError(f"a forward of {q} tokens cannot fit a capacity of {capacity} tokens")
            slack = max(1, min(cache.pool.block_size, capacity // 4))
            if layer.held + q > capacity:
                self.evict(layer, max(capacity - max(q, slack), 1), capacity)

    def after_forward(self, cache: KVMemCache) -> None:
        for layer in cache.paged_layers:
            if isinstance(layer, OffloadLayer):
                layer.offload_old()
        if self.budget.fraction is None or self.budget.fraction >= 1 or self.scorer is None:
            return  # 100%: nothing to take from any layer
        full = _compressible(cache)
        for layer, weight in zip(full, self.layer_weights(cache)):
            target = max(1, math.ceil(min(1.0, self.budget.fraction * weight) * layer.seq_length))
            # hysteresis: compact once a block's worth is over, not at every token
            if layer.held >= target + min(cache.pool.block_size, max(1, target // 4)):
                self.evict(layer, target)

    def evict(self, layer: PagedLayer, keep: int, capacity: int | None = None) -> None:
        """Keep the ``keep`` best-scored tokens of each head of ``layer``; free the rest (or, with
        mixed precision, demote them to the layer's low-precision store of ``ratio * capacity``)."""
        if keep >= layer.held or self.scorer is None:
            return
        attention = layer.attention
        if isinstance(layer, MixedLayer):  # only the high-precision tokens compete
            keys, values = layer.high.gather()
            attention = None if attention is None else attention[:, layer.num_low :]
        else:
            keys, values = layer.gather()
        valid = layer.valid()  # [H, T] where heads hold different counts (AdaKV), else None
        scores = self.scorer.score(
            ScoreInputs(
                keys=keys[0],
                values=values[0],
                queries=layer.recent_queries,
                attention=attention,
                scaling=layer.head_dim**-0.5 if layer.scaling is None else layer.scaling,
                keep=keep,
                layer_idx=layer.layer_idx,
                valid=valid,
            )
        )
        if self.heads is not None:
            assert isinstance(layer, RaggedLayer)
            layer.compact_heads(self.heads.select(scores, valid, keep))
            return
        chosen = torch.topk(scores, keep, dim=-1).indices.sort(dim=-1).values  # [H, keep]
        if isinstance(layer, MixedLayer):
            assert capacity is not None, "mixed precision needs a fixed capacity"
            layer.demote(chosen, layer.ratio * capacity)
        elif self.merge is None:
            layer.compact(chosen)
        else:
            layer.compact(chosen, *self.merge.apply(keys[0], values[0], chosen))


def _compressible(cache: KVMemCache) -> list[PagedLayer]:
    return [layer for layer in cache.paged_layers if layer.window is None]
