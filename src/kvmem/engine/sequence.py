"""One sequence's KV state and tokens, and how a forward over it is prepared and finished.

The engine batches many sequences into one forward (``kvmem.model.batch``): each scheduled
sequence hands it a ``Row`` (``begin``), and is told when the forward is done (``end``): its
policy compresses, its completed blocks are published for prefix reuse. ``prefill`` and
``step`` run a forward of this sequence alone, for callers that drive one sequence by hand
(the benchmark's teacher forcing, forks).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from kvmem.compress.observe import Observer
from kvmem.compress.policy import Policy
from kvmem.errors import KVBudgetError
from kvmem.kv.pool import KVPool
from kvmem.model.batch import Row, forward
from kvmem.model.cache import KVMemCache
from kvmem.model.spec import ModelSpec
from kvmem.prefix.cache import PrefixCache, PrefixState
from kvmem.tiers.offload import OffloadStore


class Sequence:
    """Tokens of one conversation or request, and the cache that holds their keys and values.

    ``token_ids`` may run ahead of the cache (tokens appended but not yet computed): the next
    forwards compute exactly those. ``release`` gives every block back to the pool.
    ``byte_budget`` is the sequence's own share of the pool for a policy that evicts or offloads
    (None: the policy's budget).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        pool: KVPool,
        spec: ModelSpec,
        policy: Policy | None = None,
        prefix: PrefixCache | None = None,
        salt: str | None = None,
        byte_budget: int | None = None,
    ) -> None:
        self.model = model
        self.byte_budget = byte_budget
        self._in_prompt = self._prompt_end = False  # a prompt running at full size (Policy.after_prompt)
        # shared prefix blocks: adopted by `reuse_prefix`, completed blocks published after each forward
        self.prefix = prefix
        self.salt = salt
        self.prefix_state: PrefixState | None = None if prefix is None else prefix.state(salt, policy)
        self.pool = pool
        self.spec = spec
        self.policy = policy
        self.cache = self._new_cache()
        self.token_ids: list[int] = []
        scorer = None if policy is None else policy.scorer
        window = (
            0 if scorer is None or policy is None else max(scorer.query_window, policy.allocator.query_window)
        )
        ragged = policy is not None and policy.heads is not None
        self.observer = (
            Observer(self.cache, window, scorer.accumulates)
            if scorer is not None and (window or scorer.accumulates or ragged)
            else None
        )

    def _new_cache(self) -> KVMemCache:
        policy = self.policy
        specs = None if policy is None else policy.layer_specs(self.spec)
        offloads = specs is not None and any(spec.needs_store for spec in specs)
        cache = KVMemCache(
            self.pool,
            self.spec,
            specs,
            device=self.model.device,
            store=OffloadStore() if offloads else None,
        )
        cache.byte_budget = self.byte_budget
        if offloads:
            assert policy is not None
            for layer in cache.kv_layers:
                layer.set_room(policy.offload_room(cache))
        return cache

    def reset(self) -> None:
        """Drop every block and start the cache anew: the tokens stay, all pending (recomputation)."""
        self.cache.release()
        self.cache = self._new_cache()
        self._in_prompt = self._prompt_end = False
        if self.observer is not None:
            self.observer.cache = self.cache
        if self.prefix is not None:
            self.prefix_state = self.prefix.state(self.salt, self.policy)

    @property
    def num_cached(self) -> int:
        return self.cache.num_tokens

    @property
    def num_pending(self) -> int:
        return len(self.token_ids) - self.num_cached

    def reuse_prefix(self, align: int = 1) -> int:
        """Adopt the longest cached prefix of ``token_ids`` (nothing computed yet); tokens reused,
        a multiple of ``align`` (see ``PrefixCache.attach``)."""
        if self.prefix is None or self.prefix_state is None or self.num_cached or self.prefix_state.hashes:
            return 0
        return self.prefix.attach(self.cache, self.token_ids, self.prefix_state, align)

    def forget_prefix(self) -> None:
        """Undo ``reuse_prefix`` before anything was computed on top of it."""
        assert self.prefix_state is not None and self.num_cached == self.prefix_state.reused_tokens
        self.cache.release()
        self.prefix_state.hashes.clear()
        self.prefix_state.reused_tokens = 0

    def bytes_to_grow(self, extra_tokens: int) -> int:
        """Most extra pool bytes this sequence can take for its pending tokens and ``extra_tokens``
        more, whatever the chunking: what an admission must set aside for it.

        A policy that evicts or offloads under a byte budget keeps the sequence within that budget.
        """
        growth = self.cache.bytes_to_grow(self.num_pending + extra_tokens)
        if self.deferring:  # the prompt at full size first: that transient peak is reserved
            return max(self.cache.bytes_to_grow(self.num_pending), self._capped(growth))
        return self._capped(growth)

    def _capped(self, growth: int) -> int:
        if self.policy is not None and self.policy.caps(self.cache):
            budget = self.policy.byte_budget(self.cache)
            assert budget is not None
            growth = min(growth, max(0, budget - self.cache.nbytes))
        return growth

    def check_policy(self, extra_tokens: int, others: int = 0) -> None:
        """Raise ``KVBudgetError`` if the policy cannot serve this sequence at all (its budget
        holds less than a minimal cache; an offloading layer's room is too small); ``others``:
        bytes other sequences hold, for a sequence without a share of its own."""
        if self.policy is None:
            return
        if self.policy.evicts:
            self.policy.capacities(self.cache)  # raises if the budget cannot hold even a minimal cache
        if self.deferring and self.pool.budget is not None:
            peak = self.cache.bytes_to_grow(self.num_pending)
            if peak > self.pool.budget - self.cache.nbytes:
                raise KVBudgetError(
                    peak,
                    self.pool.budget - self.cache.nbytes,
                    self.pool.budget,
                    what=f"the {self.num_pending}-token prompt at full size, before it is compressed",
                )
        if self.policy.offload is not None:
            shared = others if self.cache.byte_budget is None else 0
            self.policy.fit_offload(self.cache, len(self.token_ids) + extra_tokens, shared)

    def reserve(self, extra_tokens: int) -> None:
        """Raise ``KVBudgetError`` unless the pool can hold the pending tokens plus ``extra_tokens``
        (for a sequence run on its own; the engine's admission does this for many)."""
        if self.policy is not None and self.policy.caps(self.cache):
            self.check_policy(extra_tokens, self.pool.bytes_used - self.cache.nbytes)
            return
        needed = self.bytes_to_grow(extra_tokens)
        free = self.pool.bytes_available  # blocks cached for reuse give way when needed
        if free is not None and needed > free:
            raise KVBudgetError(
                needed, free, self.pool.budget, what=f"{self.num_pending + extra_tokens} more tokens"
            )

    @property
    def deferring(self) -> bool:
        """In a prompt (several pending tokens) under a policy that compresses after the prompt."""
        if self.policy is None or not self.policy.after_prompt:
            return False
        return self.num_pending > 1 or self._in_prompt

    def chunk_size(self, limit: int) -> int:
        """Tokens the next forward may compute, at most ``limit`` and the pending ones."""
        size = min(limit, self.num_pending)
        # capacities may change as a policy learns (CAKE): sized anew; a deferred prompt runs at full size
        if self.policy is not None and not self.deferring:
            size = min(size, self.policy.max_chunk(self.cache) or size)
        if self.prefix is not None:  # sliding layers' blocks stay token-aligned (see PrefixCache)
            size = min([size] + [layer.keep for layer in self.cache.kv_layers if layer.keep])
        return max(1, size)

    def begin(self, size: int, all_logits: bool = False) -> Row:
        """Prepare a forward of the next ``size`` pending tokens (the policy makes room first)."""
        if self.policy is not None:
            self._in_prompt = self.deferring
            self._prompt_end = self._in_prompt and size == self.num_pending  # the prompt's last chunk
            self.policy.before_forward(self.cache, size, defer=self._in_prompt)
        start = self.num_cached
        return Row(self.cache, self.token_ids[start : start + size], self.observer, all_logits)

    def end(self) -> None:
        """After the forward: the policy compresses, completed blocks are published for reuse."""
        if self.policy is not None:
            defer = self._in_prompt and not self._prompt_end
            self.policy.after_forward(self.cache, defer=defer, prompt_end=self._prompt_end)
            self._in_prompt = defer
        if self.prefix is not None and self.prefix_state is not None:
            self.prefix.publish(self.cache, self.token_ids, self.prefix_state)

    @torch.inference_mode()
    def prefill(self, chunk_size: int, all_logits: bool = False) -> torch.Tensor:
        """Compute the pending tokens in chunks; return logits [V] of the last one ([T, V] if all_logits)."""
        if not self.num_pending:
            raise ValueError("nothing to prefill: every token is already cached")
        outputs = []
        while self.num_pending:
            row = self.begin(self.chunk_size(chunk_size), all_logits)
            (logits,) = forward(self.model, [row])
            self.end()
            outputs.append(logits)
        return torch.cat(outputs) if all_logits else outputs[-1]

    @torch.inference_mode()
    def step(self, token_id: int) -> torch.Tensor:
        """Append one token, compute it, return the next-token logits [V]."""
        self.token_ids.append(token_id)
        (logits,) = forward(self.model, [self.begin(1)])
        self.end()
        return logits

    def fork(self, pool: KVPool | None = None) -> Sequence:
        """An independent copy of this sequence (tokens and cache) in ``pool`` (default: a new
        pool with this one's configuration). The copy's blocks are new: it costs their bytes."""
        pool = pool if pool is not None else KVPool(self.pool.config)
        new = Sequence(self.model, pool, self.spec, self.policy, byte_budget=self.cache.byte_budget)
        new.cache.release()
        new.cache = self.cache.copy_to(pool)
        if new.observer is not None:
            new.observer.cache = new.cache
        new.token_ids = list(self.token_ids)
        return new

    def release(self) -> None:
        self.cache.release()
