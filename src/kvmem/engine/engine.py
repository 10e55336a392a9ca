"""``Engine``: many requests sharing one KV pool, continuous batching, one forward per step.

``step()`` is schedule, one batched forward, post-process: requests join and leave between
steps, prefill chunks and decodes share a forward. Each request has its own sampling, stop
strings, compression policy, cache salt and, for policies that evict or offload under a byte
budget, its own share of the pool (an equal share, ``budget / max_num_seqs``, unless given).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq

import torch

from kvmem.compress.policy import Policy
from kvmem.compress.registry import make_policy
from kvmem.engine.config import EngineConfig
from kvmem.engine.request import Request, RequestOutput, Status
from kvmem.engine.result import GenerationResult, GenerationStats
from kvmem.engine.sampling import SamplingParams, sample
from kvmem.engine.scheduler import Scheduler
from kvmem.engine.sequence import Sequence
from kvmem.engine.text import StopMatcher
from kvmem.errors import KVBudgetError, KVMemError, PromptTooLongError
from kvmem.kv.budget import parse_budget
from kvmem.kv.pool import KVPool, PoolConfig
from kvmem.model.attention import register as register_attention
from kvmem.model.batch import forward
from kvmem.model.loader import LoadedModel, cache_dir
from kvmem.prefix.cache import PrefixCache
from kvmem.tiers.disk import DiskTier
from kvmem.tiers.redis import RedisTier
from kvmem.tiers.swap import SwapSpace

ENGINE_POLICY = object()  # "the engine's policy" for add_request
UNBOUNDED_NEW_TOKENS = 4096  # max_new_tokens=None for a model that states no context length


class Engine:
    """The engine over ``loaded`` (a model already loaded, on the device it should run on).

    Not thread-safe: one caller drives ``add_request`` / ``step`` / ``abort`` (a server runs them
    on one loop). Every KV block lives in ``self.pool``; ``close`` frees the swap space.
    """

    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        self.loaded = loaded
        self.config = config
        self.pool = KVPool(PoolConfig(config.pool_budget, config.block_size))
        self.policy = None if config.policy is None else self._make_policy(config.policy)
        self._policies: dict[str, Policy | None] = {config.policy or "": self.policy}
        # every forward runs through kvmem's attention (elsewhere it is transformers' SDPA, unchanged)
        loaded.model.set_attn_implementation(register_attention())
        if config.threads is not None:  # the process's one pool: PyTorch's ops and kvmem's kernel
            torch.set_num_threads(config.threads)
        self.prefix: PrefixCache | None = None
        if config.shares_prefixes:
            disk = config.disk_cache
            tier = None if disk is None else DiskTier(disk, config.disk_cache_bytes)
            url = config.redis_cache
            shared = None if url is None else RedisTier(url, config.redis_ttl_s)
            self.prefix = PrefixCache(self.pool, loaded.identity, tier, shared)
        self.swap = SwapSpace(cache_dir() / "swap")
        self.scheduler = Scheduler(config, self.pool, self.swap)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.steps = 0

    # --- requests
    def _make_policy(self, name: str) -> Policy:
        policy = make_policy(name, self.config.budget)
        if self.config.compress_after_prompt is not None and policy.evicts:
            policy = dataclasses.replace(policy, after_prompt=True)
        return policy

    def policy_for(self, name: object = ENGINE_POLICY) -> Policy | None:
        """The engine's policy, or the named one (built once, under the engine's budget)."""
        if name is ENGINE_POLICY:
            return self.policy
        key = "" if name is None else str(name)
        if key not in self._policies:
            policy = self._make_policy(key) if key else None
            if self.prefix is not None:
                self.prefix.state(None, policy)  # raises PrefixSharingError for eviction policies
            self._policies[key] = policy
        return self._policies[key]

    def add_request(
        self,
        prompt: str | Seq[int] | None,
        max_new_tokens: int | None = 128,
        params: SamplingParams | None = None,
        stop: Seq[str] = (),
        *,
        policy: object = ENGINE_POLICY,
        cache_salt: str | None = None,
        kv_budget: int | str | None = None,
        request_id: str | None = None,
        sequence: Sequence | None = None,
        ignore_eos: bool = False,
    ) -> str:
        """Queue a request; return its id. ``prompt`` is text or token ids; or give a ``sequence``
        whose pending tokens are the prompt (a chat turn: the sequence stays the caller's).

        ``policy``: a policy name for this request (default: the engine's; None: no policy).
        ``kv_budget``: this request's byte share of the pool, for a policy that evicts or offloads
        (default: an equal share); without such a policy, a cap its whole growth must fit.
        ``ignore_eos``: generate ``max_new_tokens`` whatever comes (benchmarks, as vLLM's option).
        ``max_new_tokens=None``: as many as the context leaves and the request's budget could ever
        hold alone (a server's default when a client sets no limit).

        Raises ``PromptTooLongError``, ``KVBudgetError`` (it could never fit, even alone) and
        ``ValueError`` / ``InvalidBudgetError`` for bad arguments, before anything is queued.
        """
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        share = parse_budget(kv_budget)
        owned = sequence is None
        if sequence is None:
            chosen = self.policy_for(policy)
            sequence = Sequence(
                self.loaded.model,
                self.pool,
                self.loaded.spec,
                chosen,
                self.prefix,
                cache_salt,
                self._share(chosen, share),
            )
            sequence.token_ids = self.encode(prompt if prompt is not None else "")
        as_many_as_fit = max_new_tokens is None
        max_new_tokens = self._fit_context(sequence, max_new_tokens)
        request = Request(
            rid,
            sequence,
            params or SamplingParams(),
            max_new_tokens,
            StopMatcher(self.loaded.tokenizer, tuple(stop)),
            frozenset() if ignore_eos else frozenset(_eos_ids(self.loaded)),  # read per request
            owns_sequence=owned,
        )
        try:
            if as_many_as_fit:
                self._shrink_to_fit(request, share)
            self._check_fits(request, share)
        except BaseException:
            if owned:
                sequence.release()
            raise
        self.requests[rid] = request
        self.scheduler.add(request)
        return rid

    def encode(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.loaded.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        return [int(t) for t in prompt]

    def _share(self, policy: Policy | None, share: int | None) -> int | None:
        if policy is None or not policy.takes_share:
            return None
        if share is not None:
            return share
        budget = self.shared_bytes(policy)
        return None if budget is None else budget // self.config.max_num_seqs

    def shared_bytes(self, policy: Policy) -> int | None:
        """The bytes a policy's sequences share among them: its budget (the pool's cap is larger
        when compressing after the prompt), else the pool's."""
        return policy.budget.bytes if policy.budget.bytes is not None else self.pool.budget

    def _fit_context(self, sequence: Sequence, max_new_tokens: int | None) -> int:
        context = self.loaded.spec.max_context
        if not sequence.token_ids:
            raise ValueError("the prompt is empty")
        if context and len(sequence.token_ids) >= context:
            raise PromptTooLongError(
                f"the prompt is {len(sequence.token_ids)} tokens but {self.config.model} holds at most "
                f"{context} tokens of context"
            )
        if max_new_tokens is None:
            return context - len(sequence.token_ids) if context else UNBOUNDED_NEW_TOKENS
        return min(max_new_tokens, context - len(sequence.token_ids)) if context else max_new_tokens

    def _shrink_to_fit(self, request: Request, share: int | None) -> None:
        """Lower ``request.max_new_tokens`` to the most the pool (and its share) could ever hold."""
        seq = request.seq
        if seq.policy is not None and seq.policy.caps(seq.cache):
            return  # the policy keeps it within its share however long it runs
        caps = [c for c in (share, self.pool.budget) if c is not None]
        if not caps or seq.bytes_to_grow(request.new_tokens_left()) <= min(caps):
            return
        low, high = 1, request.max_new_tokens  # bytes_to_grow is monotone in the tokens
        while low < high:
            request.max_new_tokens = mid = (low + high + 1) // 2
            if seq.bytes_to_grow(request.new_tokens_left()) <= min(caps):
                low = mid
            else:
                high = mid - 1
        request.max_new_tokens = low  # if even one does not fit, _check_fits refuses it

    def _check_fits(self, request: Request, share: int | None) -> None:
        """Refuse up front what could never fit: alone in the pool, or within its own cap."""
        seq, new = request.seq, request.new_tokens_left()
        if seq.policy is not None and seq.policy.caps(seq.cache):
            seq.check_policy(new)
            return
        need = seq.bytes_to_grow(new)
        tokens = f"the request ({seq.num_pending + new} tokens: prompt and new)"
        for cap, what in ((share, f"{tokens}, within its own share,"), (self.pool.budget, tokens)):
            if cap is not None and need > cap:
                raise KVBudgetError(need, cap, cap, what=what)

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is; every block it held goes back to the pool."""
        request = self.requests.pop(request_id, None)
        if request is None or request.finished:
            return
        self.scheduler.remove(request)
        if request.swap is not None:
            self.swap.discard(request.swap)
            request.swap = None
        if request.owns_sequence:
            request.seq.release()
        request.status = Status.FINISHED
        request.finish_reason = "abort"

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # --- the loop
    def step(self) -> list[RequestOutput]:
        """Schedule, run one batched forward, post-process; what each request gained this step."""
        work = self.scheduler.schedule()
        logits = self._run(work)
        self.steps += 1
        return self._postprocess(work, logits)

    @torch.inference_mode()
    def _run(self, work: list[tuple[Request, int]]) -> list[torch.Tensor | None]:
        rows, ran = [], []
        now = time.perf_counter()
        for request, size in work:
            if request.first_scheduled is None:
                request.first_scheduled = now
            try:
                rows.append(request.seq.begin(size))
                ran.append(request)
            except KVMemError as exc:  # its policy cannot go on (an offloading layer out of room)
                self._fail(request, exc)
        if not rows:
            return [None] * len(work)
        out = iter(forward(self.loaded.model, rows))
        for request in ran:
            request.seq.end()
            request.peak_kv_bytes = max(request.peak_kv_bytes, request.seq.cache.nbytes)
        return [next(out) if request in ran else None for request, _ in work]

    def _postprocess(
        self, work: list[tuple[Request, int]], logits: list[torch.Tensor | None]
    ) -> list[RequestOutput]:
        outputs = []
        for (request, _), row in zip(work, logits):
            if request.finished:  # failed before its forward
                outputs.append(self._output(request, "", []))
            elif row is not None and request.seq.num_pending == 0:  # its pending tokens are all in
                outputs.append(self._emit(request, row))
        refused = self.scheduler.refused
        outputs += [self._output(request, "", []) for request in refused]
        refused.clear()
        stuck = None if work else self.scheduler.stuck()
        if stuck is not None:
            need, free = self.scheduler.growth(stuck), self.pool.bytes_available or 0
            what = "the request, while the rest of the pool is held outside the engine"
            self._fail(stuck, KVBudgetError(need, free, self.pool.budget, what=what))
            outputs.append(self._output(stuck, "", []))
        for output in outputs:
            if output.finished:
                self.requests.pop(output.request_id, None)
        return outputs

    def _emit(self, request: Request, logits: torch.Tensor) -> RequestOutput:
        token = sample(logits, request.params, request.generator)
        if request.first_token is None:
            request.first_token = time.perf_counter()
        request.generated.append(token)
        request.seq.token_ids.append(token)  # pending: computed by the next step (or the next turn)
        piece = request.matcher.push(token)
        if token in request.eos:
            request.finish_reason = "eos"
        elif request.matcher.stopped:
            request.finish_reason = "stop"
        elif len(request.generated) >= request.max_new_tokens:
            request.finish_reason = "length"
        if request.finish_reason is not None:
            piece += request.matcher.flush()
            self._finish(request)
        return self._output(request, piece, [token])

    def _finish(self, request: Request) -> None:
        request.status = Status.FINISHED
        self.scheduler.remove(request)
        request.result = self._result(request)
        if request.owns_sequence:
            request.seq.release()
        if self.prefix is not None:
            self.prefix.flush()  # this request's new blocks reach the Redis and disk tiers, if any

    def _fail(self, request: Request, error: Exception) -> None:
        request.error = error
        request.status = Status.FINISHED
        self.scheduler.remove(request)
        if request.owns_sequence:
            request.seq.release()

    def _output(self, request: Request, text: str, tokens: list[int]) -> RequestOutput:
        return RequestOutput(
            request.request_id, text, tokens, request.finished, request.result, request.error
        )

    def _result(self, request: Request) -> GenerationResult:
        seq, first = request.seq, request.first_token or time.perf_counter()
        started = request.first_scheduled or request.arrival
        decode_s = time.perf_counter() - first
        n = len(request.generated)
        state = seq.prefix_state
        stats = GenerationStats(
            prompt_tokens=request.prompt_tokens,
            tokens_prefilled=request.tokens_prefilled,
            new_tokens=n,
            kv_bytes=seq.cache.nbytes,
            kv_tokens=seq.cache.tokens_held,
            kv_bytes_full=self.loaded.spec.full_cache_bytes(seq.num_cached, self.pool.config.block_size),
            prefill_s=first - started,
            ttft_s=first - request.arrival,
            decode_s=decode_s,
            decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            tokens_reused=request.tokens_reused,
            tokens_from_disk=0 if state is None or not request.tokens_reused else state.disk_tokens,
            tokens_from_redis=0 if state is None or not request.tokens_reused else state.redis_tokens,
            preemptions=request.preemptions,
            tokens_seen=seq.num_cached,
        )
        return GenerationResult(
            request.matcher.text, list(request.generated), request.finish_reason or "length", stats
        )

    def run_until_done(
        self, request_ids: Seq[str], after_step: Callable[[], None] | None = None
    ) -> Iterator[RequestOutput]:
        """Step until every one of ``request_ids`` has finished; yield their outputs as they come.
        ``after_step``: called after every step (a prefill shows its progress with it)."""
        wanted = set(request_ids)
        while wanted:
            outputs = self.step()
            if after_step is not None:
                after_step()
            for output in outputs:
                if output.request_id in wanted:
                    yield output
                    if output.finished:
                        wanted.discard(output.request_id)

    def close(self) -> None:
        """Abort what is left and remove the swap space."""
        for request_id in list(self.requests):
            self.abort(request_id)
        self.swap.close()


def _eos_ids(loaded: LoadedModel) -> set[int]:
    """The end-of-sequence ids of the model's generation config, as transformers' generate uses them."""
    eos = loaded.model.generation_config.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, list) else [eos])}
