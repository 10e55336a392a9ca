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
from dataclasses import dataclass
from typing import TypeVar

import torch

from kvmem.compress.allocator import Allocator, Uniform
from kvmem.compress.budget import KVBudget
from kvmem.compress.format_parts import SLIDING, Quant, Residual, Sliding
from kvmem.compress.heads import AdaKV
from kvmem.compress.merge import Merge
from kvmem.compress.mixed import MixedPrecision
from kvmem.compress.offload import Offload
from kvmem.compress.part import Part, UnknownPolicyError
from kvmem.compress.scorer import ScoreInputs, Scorer
from kvmem.errors import InvalidBudgetError, KVBudgetError
from kvmem.model.cache import KVMemCache
from kvmem.model.format import Quantizer, TokenFormat
from kvmem.model.layers import KVLayer, LayerSpec, UnsupportedLayerError, default_spec
from kvmem.model.layers.offload import FLOOR_ADVICE
from kvmem.model.spec import ModelSpec

P = TypeVar("P", bound=Part)


@dataclass(frozen=True)
class Policy:
    """Parts (``kvmem.compress.part``: an eviction scorer, a quantizer, or both, ``snapkv+kivi4``,
    and what goes with them) under a budget. ``parts`` are in the order of their names; a slot's
    part is read as ``scorer``, ``quant``, … (None where empty).

    With no scorer nothing is evicted: the budget then refuses requests that do not fit, as
    without a policy, but counts the quantized block sizes.

    ``after_prompt``: compress once after each prompt instead of chunk by chunk. A prefill of
    several tokens runs at full size (the pool's budget bounds that transient peak) and nothing is
    evicted until its last chunk has run; then every layer is cut to its capacity with the whole
    prompt, and so the question at its end, in view (kvpress's way; SnapKV's observation window is
    then the prompt's last queries). Decoding steps compress as usual.

    ``residual``: the format of each layer's block being filled (``res8``), beside ``quant``.

    ``sliding``: the block format of sliding-window layers (``sliding-rotk3v2``), where it differs
    from ``quant``'s: precision by layer importance. A sliding layer attends to its last window
    only and long-range retrieval rests on the full-attention layers (on Gemma 3 at 1k tokens,
    rotated 2-bit keys in the 3 global layers cost 2.5x the KL that they cost in the 15 sliding
    ones), so the full-attention layers can keep more bits than the local ones.
    """

    parts: tuple[Part, ...]
    budget: KVBudget
    after_prompt: bool = False

    def __post_init__(self) -> None:
        # the rules of each part are its own (``Part.needs``, ``excludes``, ``check``); these are the policy's
        slots = [part.slot for part in self.parts]
        if not slots:
            raise UnknownPolicyError("a policy needs an eviction scorer, a quantizer, or both")
        if len(set(slots)) < len(slots):
            raise UnknownPolicyError(
                f"policy {self.name!r}: combine at most one eviction method, one layer allocation, one head "
                "allocation, merging, one quantizer, one for sliding layers and one residual format"
            )
        filled = set(slots)
        for part in self.parts:
            clash = [slot for slot in part.excludes if slot in filled]
            if clash:
                raise UnknownPolicyError(f"policy {self.name!r}: {part.excluded(clash)}")
        for part in self.parts:
            if part.needs and not filled.intersection(part.needs):
                raise UnknownPolicyError(f"policy {self.name!r}: {part.unmet()}")
        for part in self.parts:
            part.check(self)
        if self.after_prompt and not self.evicts:
            raise ValueError("compressing after the prompt needs an eviction method (snapkv, h2o, …)")
        if not self.evicts and (self.budget.fraction is not None or self.budget.tokens is not None):
            raise InvalidBudgetError(
                "a KV budget in % or tokens needs an eviction method (quantization alone cannot drop tokens)"
            )
        # a part that means its slot's default (``uniform``) is dropped: ``snapkv+uniform`` == ``snapkv``
        object.__setattr__(self, "parts", tuple(part for part in self.parts if not part.implied))

    def _find(self, kind: type[P]) -> P | None:
        return next((part for part in self.parts if isinstance(part, kind)), None)

    @property
    def name(self) -> str:
        return "+".join(part.name for part in self.parts if not part.implied)

    @property
    def evicts(self) -> bool:
        """Whether a part drops tokens (an eviction scorer): layers then have capacities."""
        return any(part.evicts for part in self.parts)

    @property
    def bounds(self) -> bool:
        """Whether a part keeps a sequence within a byte budget (evicting, offloading)."""
        return any(part.bounds for part in self.parts)

    @property
    def shares_prefix(self) -> bool:
        """Whether blocks made under this policy hold exactly their prefix's tokens, to be shared."""
        return all(part.shares_prefix for part in self.parts)

    @property
    def scorer(self) -> Scorer | None:
        return next((part for part in self.parts if isinstance(part, Scorer)), None)

    @property
    def allocator(self) -> Allocator:
        return next((part for part in self.parts if isinstance(part, Allocator)), Uniform())

    @property
    def heads(self) -> AdaKV | None:
        return self._find(AdaKV)

    @property
    def mixed(self) -> MixedPrecision | None:
        return self._find(MixedPrecision)

    @property
    def merge(self) -> Merge | None:
        return self._find(Merge)

    @property
    def offload(self) -> Offload | None:
        return self._find(Offload)

    @property
    def quant(self) -> Quantizer | None:
        part = self._find(Quant)
        return None if part is None else part.fmt

    @property
    def sliding(self) -> Quantizer | None:
        part = self._find(Sliding)
        return None if part is None else part.fmt

    @property
    def residual(self) -> TokenFormat | None:
        part = self._find(Residual)
        return None if part is None else part.fmt

    def layer_specs(self, spec: ModelSpec) -> list[LayerSpec]:
        """How each layer of a model stores its tokens under this policy."""
        fmt, residual = self.quant, self.residual if self.quant is not None else None
        if self.sliding is not None and all(window is None for window in spec.windows):
            raise UnsupportedLayerError(
                f"policy {self.name}: {SLIDING}-{self.sliding.name} is the format of sliding-window "
                "layers, and this model has none (every layer attends to the whole context)"
            )
        # a full-attention layer is of the kind a part asks for (perhead, mixed, offload), else paged
        asked = (part.layer_spec(fmt, residual) for part in self.parts)
        full = next((layer for layer in asked if layer is not None), default_spec(None, fmt, residual))
        specs = []
        for window in spec.windows:
            if window is not None:  # sliding layers are never evicted from: their window bounds them
                local = self.quant if self.sliding is None else self.sliding
                specs.append(default_spec(window, local, self.residual if local is not None else None))
            else:
                specs.append(full)
        return specs

    def byte_budget(self, cache: KVMemCache) -> int | None:
        """The bytes this sequence may hold: its own share of the pool if it has one, else the budget's."""
        return cache.byte_budget if cache.byte_budget is not None else self.budget.bytes

    @property
    def takes_share(self) -> bool:
        """Whether the policy keeps a sequence within a byte budget by evicting or offloading, so
        that each sequence may be given its own share of the pool."""
        by_bytes = self.budget.fraction is None and self.budget.tokens is None
        return by_bytes and self.bounds

    def caps(self, cache: KVMemCache) -> bool:
        """Whether this sequence is kept within a byte budget (its share, or the policy's)."""
        return self.takes_share and self.byte_budget(cache) is not None

    def capacities(self, cache: KVMemCache) -> dict[int, int] | None:
        """Tokens each full-attention layer may hold at most, by layer index (None: no fixed cap)."""
        budget = self.byte_budget(cache)
        if self.scorer is None or (self.budget.tokens is None and budget is None):
            return None
        full = _compressible(cache)
        weights = self.layer_weights(cache)
        if self.budget.tokens is not None:
            return {layer.layer_idx: max(1, round(self.budget.tokens * w)) for layer, w in zip(full, weights)}
        assert budget is not None
        sliding = [layer for layer in cache.kv_layers if layer.window is not None]
        fixed = sum(layer.max_bytes_to_grow(1 << 30) for layer in sliding)
        # a layer's cost is affine in its blocks: n * per_block + base
        per_block = [layer.cost_of_blocks(2) - layer.cost_of_blocks(1) for layer in full]
        base = sum(layer.cost_of_blocks(1) - p for layer, p in zip(full, per_block))
        room = budget - fixed - base
        if room < sum(per_block):  # not even one block per layer
            minimum = fixed + base + sum(per_block)
            raise KVBudgetError(
                minimum,
                budget,
                budget,
                what=f"policy {self.name}",
                advice="its least cache is a block a layer plus the sliding-window layers' windows, "
                "whatever the prompt: raise the KV budget (kv_budget= / --kv-budget), add a block format "
                "(+kivi4) or use a smaller block_size (--block-size)",
            )
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
        """Bytes each offloading layer may hold: the sequence's budget, less the sliding layers' and
        ``others`` (what other sequences hold in the pool, when it has no share of its own), shared evenly."""
        budget = self.byte_budget(cache)
        assert budget is not None
        sliding = [layer for layer in cache.kv_layers if layer.window is not None]
        fixed = sum(layer.max_bytes_to_grow(1 << 30) for layer in sliding)
        return max(0, budget - fixed - others) // max(1, len(cache.kv_layers) - len(sliding))

    def fit_offload(self, cache: KVMemCache, total_tokens: int, others: int = 0) -> None:
        """Give each layer its room and raise ``KVBudgetError`` (before anything is computed) if a
        layer cannot serve ``total_tokens`` within it."""
        room = self.offload_room(cache, others)
        full = _compressible(cache)
        for layer in full:
            layer.set_room(room)
        need = max((layer.min_bytes(total_tokens) for layer in full), default=0)
        if need > room:
            raise KVBudgetError(
                need * len(full),
                room * len(full),
                self.byte_budget(cache),
                what=f"offloading {total_tokens} tokens (resident blocks, a summary per block, a fetch)",
                advice=FLOOR_ADVICE,
            )

    def max_chunk(self, cache: KVMemCache) -> int | None:
        """The largest forward the policy can make room for (half the smallest capacity)."""
        if self.offload is not None:
            return self.offload.chunk(cache.pool.block_size)
        capacities = self.capacities(cache)
        return None if not capacities else max(1, min(capacities.values()) // 2)

    def before_forward(self, cache: KVMemCache, q: int, defer: bool = False) -> None:
        """Make room for a forward of ``q`` tokens (``defer``: a prompt chunk under ``after_prompt``,
        which runs at full size)."""
        for layer in cache.kv_layers:
            layer.before_forward(q)
        if not defer:
            self._make_room(cache, q)

    def _make_room(self, cache: KVMemCache, q: int | None) -> None:
        """Evict so that every layer can take ``q`` more tokens within its capacity (``None``: a
        slack of its own, the room left to decode after a prompt that ran at full size)."""
        capacities = self.capacities(cache)
        if not capacities:
            return
        bs = cache.pool.block_size
        for layer in _compressible(cache):
            capacity = capacities[layer.layer_idx]
            slack = max(1, min(bs, capacity // 4))
            need = slack if q is None else q
            if need > capacity:
                raise ValueError(f"a forward of {need} tokens cannot fit a capacity of {capacity} tokens")
            limit = layer.capacity_for(capacity, need)
            if layer.held + need > limit:
                keep = max(limit - max(need, slack), 1)
                if self.mixed is not None:  # demote whole blocks: none short of one is lost
                    keep = max(1, layer.held - -(-(layer.held - keep) // bs) * bs)
                self.evict(layer, keep, capacity, need)

    def after_forward(self, cache: KVMemCache, defer: bool = False, prompt_end: bool = False) -> None:
        """Compress after a forward. ``defer``: a prompt chunk under ``after_prompt``, not its last;
        ``prompt_end``: its last, after which every layer is cut to its capacity."""
        for layer in cache.kv_layers:
            layer.after_forward()
        if defer:
            return
        if prompt_end:  # the prompt ran at full size: down to every layer's capacity, room to decode
            self._make_room(cache, None)
        if self.budget.fraction is None or self.budget.fraction >= 1 or self.scorer is None:
            return  # 100%: nothing to take from any layer
        full = _compressible(cache)
        for layer, weight in zip(full, self.layer_weights(cache)):
            target = max(1, math.ceil(min(1.0, self.budget.fraction * weight) * layer.seq_length))
            # hysteresis: compact once a block's worth is over, not at every token
            if layer.held >= target + min(cache.pool.block_size, max(1, target // 4)):
                self.evict(layer, target)

    def evict(self, layer: KVLayer, keep: int, capacity: int | None = None, need: int = 0) -> None:
        """Keep the ``keep`` best-scored tokens of each head of ``layer``; what becomes of the rest
        is the layer kind's (freed, or with mixed precision demoted to a low-precision store)."""
        if keep >= layer.held or self.scorer is None:
            return
        keys, values, attention, valid = layer.scoring()  # valid: [H, T] where heads differ (AdaKV)
        scores = self.scorer.score(
            ScoreInputs(
                keys=keys,
                values=values,
                queries=layer.recent_queries,
                attention=attention,
                scaling=layer.head_dim**-0.5 if layer.scaling is None else layer.scaling,
                keep=keep,
                layer_idx=layer.layer_idx,
                valid=valid,
            )
        )
        if self.heads is not None:
            layer.keep_mask(self.heads.select(scores, valid, keep))
            return
        chosen = torch.topk(scores, keep, dim=-1).indices.sort(dim=-1).values  # [H, keep]
        if self.merge is None:
            layer.keep_slots(chosen, capacity, need=need)
        else:
            layer.keep_slots(chosen, capacity, *self.merge.apply(keys, values, chosen))


def _compressible(cache: KVMemCache) -> list[KVLayer]:
    return [layer for layer in cache.kv_layers if layer.window is None]
