"""``LLM``: generate text while kvmem's pool holds every key and value."""

from __future__ import annotations

import time
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerBase

from kvmem.compress.observe import register as register_attention
from kvmem.compress.registry import make_policy
from kvmem.engine.config import EngineConfig
from kvmem.engine.result import GenerationResult, GenerationStats
from kvmem.engine.sampling import SamplingParams, sample
from kvmem.engine.sequence import Sequence
from kvmem.engine.text import StopMatcher
from kvmem.errors import KVBudgetError, PromptTooLongError
from kvmem.kv.pool import DEFAULT_BLOCK_SIZE, KVPool, PoolConfig
from kvmem.model.loader import LoadedModel, load_model
from kvmem.model.spec import ModelSpec
from kvmem.prefix.cache import PrefixCache
from kvmem.tiers.disk import DiskTier

if TYPE_CHECKING:
    from kvmem.engine.chat import ChatSession


class LLM:
    """A model plus a KV pool under a byte budget.

    ``model`` is an embedded name, a model folder, a ``.gguf`` file, or an already ``LoadedModel``.
    Requests that cannot fit raise ``KVBudgetError`` before anything is computed; the pool stays usable.
    """

    def __init__(
        self,
        model: str | LoadedModel = "smollm2-135m",
        kv_budget: int | str | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        prefill_chunk: int = 512,
        policy: str | None = None,
        prefix_cache: bool = False,
        disk_cache: str | Path | None = None,
        disk_cache_max: int | str | None = None,
    ) -> None:
        name = model if isinstance(model, str) else model.name
        disk = None if disk_cache is None else str(disk_cache)
        self.config = EngineConfig(
            name, kv_budget, policy, block_size, prefill_chunk, prefix_cache, disk, disk_cache_max
        )
        budget = self.config.budget
        self.loaded = load_model(model) if isinstance(model, str) else model
        self.pool = KVPool(PoolConfig(budget.bytes, block_size))
        self.policy = None if policy is None else make_policy(policy, budget)
        if self.policy is not None and (self.policy.scorer is not None or self.policy.offload is not None):
            # eviction and offloaded retrieval run through kvmem's registered attention function
            self.loaded.model.set_attn_implementation(register_attention())
        self.prefix: PrefixCache | None = None
        if self.config.shares_prefixes:
            tier = None if disk is None else DiskTier(disk, self.config.disk_cache_bytes)
            self.prefix = PrefixCache(self.pool, self.loaded.identity, policy, self.policy, tier)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.loaded.tokenizer

    @property
    def spec(self) -> ModelSpec:
        return self.loaded.spec

    def new_sequence(self, cache_salt: str | None = None) -> Sequence:
        """An empty sequence; with the prefix cache on, ``cache_salt`` (e.g. a tenant id) keeps its
        cached blocks apart from every other salt's."""
        return Sequence(self.loaded.model, self.pool, self.loaded.spec, self.policy, self.prefix, cache_salt)

    def encode(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        return [int(t) for t in prompt]

    def generate(
        self,
        prompt: str | Seq[int],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        stop: Seq[str] | None = None,
        cache_salt: str | None = None,
    ) -> GenerationResult:
        """Generate a completion of ``prompt`` (text, or token ids used as given)."""
        events = self.stream(prompt, max_new_tokens, temperature, top_p, top_k, seed, stop, cache_salt)
        return _drain(events)

    def stream(
        self,
        prompt: str | Seq[int],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        stop: Seq[str] | None = None,
        cache_salt: str | None = None,
    ) -> Iterator[str | GenerationResult]:
        """Yield text pieces as they are generated, then the ``GenerationResult`` last."""
        sequence = self.new_sequence(cache_salt)
        sequence.token_ids = self.encode(prompt)
        params = SamplingParams(temperature, top_p, top_k, seed)
        try:
            yield from self.run(sequence, max_new_tokens, params, stop or ())
        finally:
            sequence.release()

    def run(
        self, sequence: Sequence, max_new_tokens: int, params: SamplingParams, stop: Seq[str]
    ) -> Iterator[str | GenerationResult]:
        """Prefill the sequence's pending tokens, then decode; yield text pieces and the result.

        The last generated token is appended to ``sequence.token_ids`` but not computed, so a chat
        turn that follows prefills it together with its own tokens.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        context = self.spec.max_context
        if context and len(sequence.token_ids) >= context:
            raise PromptTooLongError(
                f"the prompt is {len(sequence.token_ids)} tokens but {self.config.model} holds at most "
                f"{context} tokens of context"
            )
        if context:
            max_new_tokens = min(max_new_tokens, context - len(sequence.token_ids))
        reused = sequence.reuse_prefix()
        try:
            sequence.reserve(max_new_tokens - 1)
        except KVBudgetError:
            if reused:
                sequence.forget_prefix()  # a refused request leaves the sequence as it was
            raise
        prompt_tokens, prefilled = len(sequence.token_ids), sequence.num_pending
        eos = _eos_ids(self.loaded)
        generator = None if params.greedy else torch.Generator().manual_seed(params.seed)
        matcher = StopMatcher(self.tokenizer, stop)
        start = time.perf_counter()
        logits = sequence.prefill(self.config.prefill_chunk)
        prefill_s = time.perf_counter() - start
        generated: list[int] = []
        finish, ttft_s, decode_start = "length", 0.0, time.perf_counter()
        while True:
            token = sample(logits, params, generator)
            if not generated:
                ttft_s = time.perf_counter() - start
                decode_start = time.perf_counter()
            generated.append(token)
            piece = matcher.push(token)
            if piece:
                yield piece
            if token in eos:
                finish = "eos"
                break
            if matcher.stopped:
                finish = "stop"
                break
            if len(generated) >= max_new_tokens:
                break
            logits = sequence.step(token)
        sequence.token_ids.append(token)  # appended, computed by the next prefill if any
        tail = matcher.flush()
        if tail:
            yield tail
        decode_s = time.perf_counter() - decode_start
        stats = GenerationStats(
            prompt_tokens=prompt_tokens,
            tokens_prefilled=prefilled,
            new_tokens=len(generated),
            kv_bytes=sequence.cache.nbytes,
            kv_tokens=sequence.num_cached,
            kv_bytes_full=sequence.num_cached * self.spec.kv_bytes_per_token,
            prefill_s=prefill_s,
            ttft_s=ttft_s,
            decode_s=decode_s,
            decode_tokens_per_s=(len(generated) - 1) / decode_s
            if len(generated) > 1 and decode_s > 0
            else 0.0,
            tokens_reused=reused,
            tokens_from_disk=0
            if sequence.prefix_state is None or not reused
            else sequence.prefix_state.disk_tokens,
        )
        if self.prefix is not None:
            self.prefix.flush()  # this request's new blocks reach the disk tier, if any
        yield GenerationResult(matcher.text, generated, finish, stats)

    def chat(self, system: str | None = None, cache_salt: str | None = None) -> ChatSession:
        """A multi-turn conversation whose KV state persists between turns."""
        from kvmem.engine.chat import ChatSession

        return ChatSession(self, system, cache_salt)

    def load_chat(self, path: str | Path) -> ChatSession:
        """Resume a chat saved with ``ChatSession.save``; nothing is recomputed (``kvmem.tiers.session``)."""
        from kvmem.tiers.session import load_chat

        return load_chat(self, path)


def _eos_ids(loaded: LoadedModel) -> set[int]:
    """The end-of-sequence ids of the model's generation config, as transformers' generate uses them."""
    eos = loaded.model.generation_config.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, list) else [eos])}


def _drain(events: Iterator[str | GenerationResult]) -> GenerationResult:
    result = None
    for event in events:
        if isinstance(event, GenerationResult):
            result = event
    assert result is not None
    return result
