"""One sequence's KV state and tokens, and the two forward passes over it: prefill and step."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from kvmem.compress.observe import Observer
from kvmem.compress.policy import Policy
from kvmem.errors import KVBudgetError
from kvmem.kv.pool import KVPool
from kvmem.model.cache import KVMemCache
from kvmem.model.cache_arg import cache_kwargs
from kvmem.model.offload import OffloadLayer
from kvmem.model.spec import ModelSpec
from kvmem.prefix.cache import PrefixCache, PrefixState


class Sequence:
    """Tokens of one conversation or request, and the cache that holds their keys and values.

    ``token_ids`` may run ahead of the cache (tokens appended but not yet computed): the next
    ``prefill`` computes exactly those. ``release`` gives every block back to the pool.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        pool: KVPool,
        spec: ModelSpec,
        policy: Policy | None = None,
        prefix: PrefixCache | None = None,
        salt: str | None = None,
    ) -> None:
        self.model = model
        # shared prefix blocks: adopted by `reuse_prefix`, completed blocks published after each forward
        self.prefix = prefix
        self.prefix_state: PrefixState | None = None if prefix is None else prefix.state(salt)
        self.pool = pool
        self.spec = spec
        self.policy = policy
        ragged = policy is not None and policy.heads is not None
        self.cache = KVMemCache(
            pool,
            spec,
            None if policy is None else policy.quant,
            ragged=ragged,
            mixed=None if policy is None else policy.mixed,
            offload=None if policy is None else policy.offload,
        )
        offloads = policy is not None and policy.offload is not None
        if offloads:
            assert policy is not None
            room = policy.offload_room(self.cache)
            for layer in self.cache.paged_layers:
                if isinstance(layer, OffloadLayer):
                    layer.room = room
        self.token_ids: list[int] = []
        scorer = policy.scorer if policy is not None else None
        window = (
            0 if scorer is None or policy is None else max(scorer.query_window, policy.allocator.query_window)
        )
        self.observer = (
            Observer(self.cache, window, scorer.accumulates)
            if scorer is not None and (window or scorer.accumulates or ragged)
            else Observer(self.cache, 0, False)  # offloaded layers retrieve blocks in attention
            if offloads
            else None
        )

    @property
    def num_cached(self) -> int:
        return self.cache.num_tokens

    @property
    def num_pending(self) -> int:
        return len(self.token_ids) - self.num_cached

    def reuse_prefix(self) -> int:
        """Adopt the longest cached prefix of ``token_ids`` (nothing computed yet); tokens reused."""
        if self.prefix is None or self.prefix_state is None or self.num_cached or self.prefix_state.hashes:
            return 0
        return self.prefix.attach(self.cache, self.token_ids, self.prefix_state)

    def forget_prefix(self) -> None:
        """Undo ``reuse_prefix`` before anything was computed on top of it."""
        assert self.prefix_state is not None and self.num_cached == self.prefix_state.reused_tokens
        self.cache.release()
        self.prefix_state.hashes.clear()
        self.prefix_state.reused_tokens = 0

    def reserve(self, extra_tokens: int) -> None:
        """Raise ``KVBudgetError`` unless the pool can hold the pending tokens plus ``extra_tokens``.

        With a compression policy the policy keeps the cache within the budget instead.
        """
        if self.policy is not None and self.policy.scorer is not None:
            self.policy.capacities(self.cache)  # raises if the budget cannot hold even a minimal cache
            return
        if self.policy is not None and self.policy.offload is not None:
            total = len(self.token_ids) + extra_tokens
            others = self.pool.bytes_used - self.cache.nbytes  # other sequences in the same pool
            room = self.policy.offload_room(self.cache, others)
            for layer in self.cache.paged_layers:
                if isinstance(layer, OffloadLayer):
                    layer.room = room
            for layer in self.cache.paged_layers:
                if isinstance(layer, OffloadLayer) and layer.room is not None:
                    need = layer.min_bytes(total)
                    if need > layer.room:
                        layers = sum(isinstance(x, OffloadLayer) for x in self.cache.paged_layers)
                        raise KVBudgetError(
                            need * layers,
                            layer.room * layers,
                            self.pool.budget,
                            what=f"offloading {total} tokens (resident blocks, a summary per block, a fetch)",
                        )
            return
        needed = self.cache.bytes_to_grow(self.num_pending + extra_tokens)
        free = self.pool.bytes_available  # blocks cached for reuse give way when needed
        if free is not None and needed > free:
            raise KVBudgetError(
                needed, free, self.pool.budget, what=f"{self.num_pending + extra_tokens} more tokens"
            )

    @torch.inference_mode()
    def prefill(self, chunk_size: int, all_logits: bool = False) -> torch.Tensor:
        """Compute the pending tokens in chunks; return logits [V] of the last one ([T, V] if all_logits)."""
        pending = self.token_ids[self.num_cached :]
        if not pending:
            raise ValueError("nothing to prefill: every token is already cached")
        outputs, start = [], 0
        while start < len(pending):
            # a policy's per-layer capacities may change as it learns (CAKE): size each chunk anew
            size = chunk_size
            if self.policy is not None:
                size = min(size, self.policy.max_chunk(self.cache) or size)
            if self.prefix is not None:  # sliding layers' blocks stay token-aligned (see PrefixCache)
                size = min([size] + [layer.keep for layer in self.cache.paged_layers if layer.keep])
            chunk = torch.tensor([pending[start : start + size]], dtype=torch.long)  # [1, q]
            logits = self._forward(chunk, keep_all=all_logits)  # [1, q or 1, V]
            if all_logits:
                outputs.append(logits[0])
            start += size
        return torch.cat(outputs) if all_logits else logits[0, -1]

    @torch.inference_mode()
    def step(self, token_id: int) -> torch.Tensor:
        """Append one token, compute it, return the next-token logits [V]."""
        self.token_ids.append(token_id)
        return self._forward(torch.tensor([[token_id]], dtype=torch.long), keep_all=False)[0, -1]

    def _forward(self, input_ids: torch.Tensor, keep_all: bool) -> torch.Tensor:
        # input_ids: [1, q] -> logits: [1, q or 1, V]
        if self.policy is not None:
            self.policy.before_forward(self.cache, input_ids.shape[1])
        extra = {} if self.observer is None else {"kvmem_observer": self.observer}
        out = self.model(
            input_ids=input_ids,
            **cache_kwargs(self.model, self.cache),
            use_cache=True,
            logits_to_keep=0 if keep_all else 1,
            **extra,
        )
        if self.policy is not None:
            self.policy.after_forward(self.cache)
        if self.prefix is not None and self.prefix_state is not None:
            self.prefix.publish(self.cache, self.token_ids, self.prefix_state)
        return out.logits.float()

    def fork(self, pool: KVPool | None = None) -> Sequence:
        """An independent copy of this sequence (tokens and cache) in ``pool`` (default: a new
        pool with this one's configuration). The copy's blocks are new: it costs their bytes."""
        pool = pool if pool is not None else KVPool(self.pool.config)
        new = Sequence(self.model, pool, self.spec, self.policy)
        new.cache.release()
        new.cache = self.cache.copy_to(pool)
        if new.observer is not None:
            new.observer.cache = new.cache
        new.token_ids = list(self.token_ids)
        return new

    def release(self) -> None:
        self.cache.release()
