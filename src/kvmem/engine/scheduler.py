"""The scheduler: which requests run in the next forward, and how many tokens each computes.

Admission reserves. Every running request is owed what it can still grow to: the bytes its cache
may take for its pending tokens and the new tokens it may still generate (``bytes_to_grow``; a
policy that evicts or offloads caps it at the request's byte share). Before each step the sum of
those reservations must fit what the pool can give (free bytes plus cached prefix blocks nobody
uses); a waiting request is admitted only if its reservation fits too. So no forward ever runs
out of blocks halfway: two requests can never both be admitted and then fail mid-forward.

With ``reserve_new_tokens`` set (reserving only that many of a request's new tokens ahead, as
vLLM reserves none), more requests run at once, and when the running ones outgrow the pool the
newest is preempted: its blocks are swapped to disk (``SwapSpace``) and it resumes, bit for bit,
once the older ones leave room. A sequence that cannot be swapped (an offloading one, whose old
blocks live in its own folder) is dropped and recomputed from its tokens instead.

Each step, decoding requests come first (one token each), then prefill chunks, oldest first,
within ``max_batch_tokens``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kvmem.engine.config import EngineConfig
from kvmem.engine.request import Request, Status
from kvmem.errors import KVMemError
from kvmem.kv.pool import KVPool
from kvmem.tiers.swap import SwapSpace


@dataclass
class SchedulerStats:
    """What the scheduler did since the engine started."""

    admitted: int = 0
    queued: int = 0  # requests that waited at least one step for room in the pool
    preemptions: int = 0
    swapped_out: int = 0
    swapped_in: int = 0
    recomputed: int = 0  # preempted requests dropped and recomputed (could not be swapped)
    peak_running: int = 0


class Scheduler:
    def __init__(self, config: EngineConfig, pool: KVPool, swap: SwapSpace) -> None:
        self.config = config
        self.pool = pool
        self.swap = swap
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.swapped: list[Request] = []  # oldest arrival first
        self.stats = SchedulerStats()
        self.refused: list[Request] = []  # ended while waiting (their policy cannot serve them)
        self._admissions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Forget ``request`` wherever it is (the caller frees what it holds)."""
        for queue in (self.waiting, self.running, self.swapped):
            if request in queue:
                queue.remove(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def stuck(self) -> Request | None:
        """The request at the head of the queues when nothing runs and it still cannot start (the
        pool is held by sequences outside the engine): it would wait forever."""
        if self.running:
            return None
        queue = self.swapped or list(self.waiting)
        return queue[0] if queue else None

    def schedule(self) -> list[tuple[Request, int]]:
        """Requests to run in the next forward, with the tokens each computes; may preempt."""
        while self.running and self._reserved() > self._available():
            self._preempt(max(self.running, key=lambda r: r.admitted))
        self._resume()
        self._admit()
        self.stats.peak_running = max(self.stats.peak_running, len(self.running))
        budget, work = self.config.max_batch_tokens, []
        for request in sorted(self.running, key=lambda r: (r.seq.num_pending > 1, r.admitted)):
            pending = request.seq.num_pending
            if budget == 0 or pending == 0:
                continue
            size = 1 if pending == 1 else request.seq.chunk_size(min(self.config.prefill_chunk, budget))
            work.append((request, size))
            budget -= size
        return work

    # --- reservations
    def growth(self, request: Request) -> int:
        """Bytes ``request`` may still take: its reservation."""
        return request.seq.bytes_to_grow(request.new_tokens_left(self.config.reserve_new_tokens))

    def _reserved(self, extra: int = 0) -> int:
        return sum(self.growth(r) for r in self.running) + extra

    def _available(self) -> float:
        available = self.pool.bytes_available
        return float("inf") if available is None else available

    def _fits(self, need: int) -> bool:
        return len(self.running) < self.config.max_num_seqs and self._reserved(need) <= self._available()

    # --- moving requests between queues
    def _admit(self) -> None:
        while self.waiting:
            request = self.waiting[0]
            reused = request.seq.reuse_prefix(self.config.reuse_align)
            try:
                request.seq.check_policy(request.new_tokens_left(None))
            except KVMemError as exc:  # refused by its policy: it ends here, with the reason
                self.waiting.popleft()
                request.error = exc
                request.status = Status.FINISHED
                self.refused.append(request)
                continue
            if not self._fits(self.growth(request)):
                if reused:
                    request.seq.forget_prefix()
                if not request.waited:
                    request.waited = True
                    self.stats.queued += 1
                return
            self.waiting.popleft()
            if request.first_scheduled is None:  # first admission (not a recomputation)
                request.tokens_reused = reused
                request.tokens_prefilled = request.seq.num_pending
            self._run(request)
            self.stats.admitted += 1

    def _resume(self) -> None:
        while self.swapped:
            request = self.swapped[0]
            assert request.swap is not None
            if not self._fits(request.swap.nbytes + request.swap_growth):
                return
            self.swapped.pop(0)
            try:
                self.swap.swap_in(request.swap, request.seq.cache)
                self.stats.swapped_in += 1
            except KVMemError:  # the swap file is damaged or gone: recompute the sequence instead
                self.swap.discard(request.swap)
                request.seq.reset()
                request.swap = None
                self.waiting.appendleft(request)
                self.stats.recomputed += 1
                continue
            request.swap = None
            self._run(request)

    def _run(self, request: Request) -> None:
        request.status = Status.RUNNING
        request.admitted = self._admissions
        self._admissions += 1
        self.running.append(request)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        request.preemptions += 1
        self.stats.preemptions += 1
        growth = self.growth(request)
        try:
            request.swap = self.swap.swap_out(request.seq.cache)
        except (KVMemError, OSError):  # cannot be saved (offload), or no disk: drop and recompute
            request.seq.reset()
            request.status = Status.WAITING
            self.waiting.appendleft(request)
            self.stats.recomputed += 1
            return
        request.swap_growth = growth
        request.status = Status.SWAPPED
        self.swapped.append(request)
        self.swapped.sort(key=lambda r: r.arrival)
        self.stats.swapped_out += 1
