"""``EngineLoop``: one thread drives the engine; HTTP handlers on the event loop talk to it.

The engine is not thread-safe, so it has one owner: a thread that takes new requests and aborts
from an inbox between steps, runs ``engine.step()`` while there is work, and hands each request's
outputs to its ``Handle`` (an ``asyncio.Queue`` on the server's event loop). The model's forward
releases the GIL, so the event loop keeps serving while a step runs.

Back-pressure: at most ``max_num_seqs + max_waiting`` requests are in the engine at once; one
more is refused with ``QueueFullError`` (the server's 429). While draining, every new request
is refused with ``DrainingError`` (503); a request still running when the drain's deadline passes
is cut: it ends with a ``DrainingError`` as its last output, so its client gets an error, not a
dropped connection.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from kvmem.engine.engine import ENGINE_POLICY, Engine
from kvmem.engine.request import RequestOutput
from kvmem.engine.sampling import SamplingParams
from kvmem.errors import KVBudgetError, KVMemError, PromptTooLongError
from kvmem.server.metrics import ServerMetrics

log = logging.getLogger("kvmem.server")


class QueueFullError(KVMemError):
    """The engine holds as many requests as it queues; try again later."""

    def __init__(self, limit: int, retry_after_s: int) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(
            f"the server is at capacity ({limit} requests in flight); retry in {retry_after_s} s"
        )


class DrainingError(KVMemError):
    """The server is shutting down: it takes no new requests and, past its drain timeout, ends the
    running ones."""


@dataclass(frozen=True)
class Submission:
    """One request for the engine. ``policy``: a policy name, ``""`` for none, or None for the
    server's own."""

    prompt: list[int]
    max_new_tokens: int | None
    params: SamplingParams
    stop: tuple[str, ...] = ()
    policy: str | None = None
    cache_salt: str | None = None
    kv_budget: int | str | None = None
    ignore_eos: bool = False


@dataclass(eq=False)
class Handle:
    """A request in flight: its outputs arrive on ``outputs`` in order, the last one finished."""

    request_id: str
    outputs: asyncio.Queue[RequestOutput] = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.perf_counter)
    last_token: float | None = None
    finished: bool = False


class EngineLoop:
    def __init__(self, engine: Engine, metrics: ServerMetrics, max_waiting: int) -> None:
        self.engine = engine
        self.metrics = metrics
        self.limit = engine.config.max_num_seqs + max_waiting
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._handles: dict[str, Handle] = {}
        self._ids = 0
        self.draining = False
        self._deadline: float | None = None  # when a drain cuts the requests still running
        self._drain_s = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="kvmem-engine", daemon=True)

    # --- the event loop's side
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.metrics.observe_engine(self.engine)
        self._thread.start()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def submit(self, submission: Submission) -> Handle:
        """Queue ``submission``; raise what the engine's ``add_request`` raises, ``QueueFullError``
        or ``DrainingError``."""
        with self._lock:
            if self.draining:
                raise DrainingError("the server is shutting down")
            if self._in_flight >= self.limit:
                raise QueueFullError(self.limit, retry_after_s=1)
            self._in_flight += 1
            self._ids += 1
            handle = Handle(f"cmpl-{self._ids:x}-{time.time_ns() % 10**9:x}")
        assert self._loop is not None
        accepted: asyncio.Future[None] = self._loop.create_future()
        self._post("add", (submission, handle, accepted))
        try:
            await accepted
        except asyncio.CancelledError:  # the client left before the engine took it
            self.abort(handle.request_id)
            raise
        return handle

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks (safe from any thread, and for a finished one)."""
        self._post("abort", request_id)

    def begin_drain(self, timeout_s: float) -> None:
        """Refuse new requests from now on; ``timeout_s`` later the engine thread cuts the running
        ones (each ends with a ``DrainingError``). A second call keeps the first deadline."""
        with self._lock:
            if self.draining:
                return
            self.draining = True
            self._drain_s = timeout_s
            self._deadline = time.monotonic() + timeout_s
        if self._in_flight:
            log.warning(
                "kvmem serve: shutting down; waiting up to %.3g s for %d running request(s)",
                timeout_s,
                self._in_flight,
            )

    def drain(self, timeout_s: float) -> None:
        """``begin_drain`` (if not begun), wait until the running requests have finished or been
        cut, write the prefix cache's unsaved blocks to the disk tier and stop the thread."""
        self.begin_drain(timeout_s)
        assert self._deadline is not None
        deadline = self._deadline + 5.0  # the thread cuts at its deadline, after the step it is in
        while self._in_flight and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.05)
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=max(5.0, timeout_s))

    def _post(self, kind: str, payload: object) -> None:
        self._inbox.put((kind, payload))
        self._wake.set()

    def _call(self, fn: Any, *args: object) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed (shutdown): nobody is listening
            pass

    # --- the engine thread
    def _run(self) -> None:
        engine = self.engine
        while True:
            self._wake.clear()
            self._take_inbox()
            if self._deadline is not None and self._handles and time.monotonic() >= self._deadline:
                self._cut_all()
            if engine.has_unfinished:
                try:
                    outputs = engine.step()
                except Exception as exc:  # a bug: fail what is in flight, keep serving
                    log.error("engine step failed:\n%s", traceback.format_exc())
                    outputs = self._fail_all(exc)
                # gauges first: a client that has its last token sees its blocks released in /metrics
                self.metrics.observe_engine(engine)
                self._deliver(outputs)
            elif self._stop.is_set():
                break
            else:
                self._wake.wait(0.1)
        self._shutdown()

    def _take_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._add(*payload)
            else:
                self._abort(payload)

    def _add(self, sub: Submission, handle: Handle, accepted: asyncio.Future[None]) -> None:
        try:
            self.engine.add_request(
                sub.prompt,
                sub.max_new_tokens,
                sub.params,
                sub.stop,
                policy=ENGINE_POLICY if sub.policy is None else sub.policy or None,
                cache_salt=sub.cache_salt,
                kv_budget=sub.kv_budget,
                request_id=handle.request_id,
                ignore_eos=sub.ignore_eos,
            )
        except Exception as exc:
            self._release()
            self._call(_settle, accepted, exc)
            return
        self._handles[handle.request_id] = handle
        self._call(_settle, accepted, None)
        self.metrics.observe_engine(self.engine)

    def _abort(self, request_id: str) -> None:
        handle = self._handles.pop(request_id, None)
        if handle is None:
            return
        self.engine.abort(request_id)
        self._release()
        self.metrics.finished.labels("abort").inc()
        self.metrics.observe_engine(self.engine)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.perf_counter()
        for output in outputs:
            handle = self._handles.get(output.request_id)
            if handle is None:
                continue
            if output.token_ids:
                if handle.last_token is None:
                    self.metrics.ttft.observe(now - handle.arrival)
                else:
                    self.metrics.itl.observe(now - handle.last_token)
                handle.last_token = now
                self.metrics.generated.inc(len(output.token_ids))
            if output.finished:
                del self._handles[output.request_id]
                self._release()
                if output.result is not None:
                    self.metrics.observe_finished(output.result.stats, output.result.finish_reason)
                else:
                    self.metrics.refused.labels(refusal_reason(output.error)).inc()
            self._call(handle.outputs.put_nowait, output)

    def _fail_all(self, error: Exception) -> list[RequestOutput]:
        outputs = []
        for request_id in list(self._handles):
            self.engine.abort(request_id)
            outputs.append(RequestOutput(request_id, "", [], True, None, error))
        return outputs

    def _cut_all(self) -> None:
        """The drain's deadline passed: end every running request with a ``DrainingError``."""
        error = DrainingError(
            f"the server is shutting down: this request was cut when the drain timeout "
            f"({self._drain_s:.3g} s) passed"
        )
        handles = list(self._handles.values())
        for handle in handles:
            self._abort(handle.request_id)
            self._call(handle.outputs.put_nowait, RequestOutput(handle.request_id, "", [], True, None, error))
        log.warning("kvmem serve: the drain timeout passed; %d running request(s) cut", len(handles))

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _shutdown(self) -> None:
        for request_id in list(self._handles):
            self._abort(request_id)
        prefix = self.engine.prefix
        if prefix is not None:
            prefix.flush()  # every published block reaches the disk tier
        self.engine.close()


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def refusal_reason(error: BaseException | None) -> str:
    """The ``kvmem_requests_refused`` label of an error."""
    if isinstance(error, QueueFullError):
        return "queue_full"
    if isinstance(error, DrainingError):
        return "draining"
    if isinstance(error, KVBudgetError):
        return "kv_budget"
    if isinstance(error, PromptTooLongError):
        return "prompt_too_long"
    if isinstance(error, KVMemError):
        return "policy"
    return "invalid"
