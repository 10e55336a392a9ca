"""A small load generator for an OpenAI-compatible completions server (vLLM's, or kvmem's own).

``run_load`` sends every prompt (token ids) to ``POST /v1/completions`` with at most
``concurrency`` requests in flight, each streamed (server-sent events) with greedy decoding and
``ignore_eos`` so that every request generates exactly ``max_tokens``; it records each request's
time to first token, its inter-token gaps and its end, and sums them up. Plain threads and
``http.client``: nothing to install, and the client costs little next to a model on the same CPU.
"""

from __future__ import annotations

import http.client
import itertools
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


@dataclass(frozen=True)
class RequestTiming:
    ttft_s: float
    latency_s: float
    output_tokens: int
    gaps_s: tuple[float, ...]  # between successive streamed chunks
    text: str = ""
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, where the server reports it


@dataclass(frozen=True)
class LoadResult:
    requests: int
    concurrency: int
    wall_s: float
    output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    itl_p50_s: float
    itl_p99_s: float


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values) or [float("nan")]
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def one_request(
    host: str,
    port: int,
    model: str,
    prompt: list[int],
    max_tokens: int,
    timeout: float,
    **extra: object,
) -> RequestTiming:
    """One streamed, greedy completion; ``extra``: more body fields (``cache_salt``)."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    start = time.perf_counter()
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    chunks: list[float] = []
    pieces: list[str] = []
    tokens, cached = 0, None
    while True:
        line = response.readline()
        if not line:
            break
        text = line.decode().strip()
        if not text.startswith("data:"):
            continue
        data = text[5:].strip()
        if data == "[DONE]":
            break
        event = json.loads(data)
        if event.get("usage"):
            tokens = int(event["usage"]["completion_tokens"])
            details = event["usage"].get("prompt_tokens_details") or {}
            cached = details.get("cached_tokens", cached)
        if event.get("choices") and event["choices"][0].get("text"):
            chunks.append(time.perf_counter())
            pieces.append(event["choices"][0]["text"])
    end = time.perf_counter()
    connection.close()
    first = chunks[0] if chunks else end
    gaps = tuple(b - a for a, b in itertools.pairwise(chunks))
    return RequestTiming(first - start, end - start, tokens or len(chunks), gaps, "".join(pieces), cached)


def run_load(
    host: str,
    port: int,
    model: str,
    prompts: list[list[int]],
    max_tokens: int,
    concurrency: int,
    timeout: float = 3600.0,
) -> LoadResult:
    lock = threading.Lock()
    timings: list[RequestTiming] = []

    def send(prompt: list[int]) -> None:
        timing = one_request(host, port, model, prompt, max_tokens, timeout)
        with lock:
            timings.append(timing)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for future in [pool.submit(send, p) for p in prompts]:
            future.result()
    wall = time.perf_counter() - start
    tokens = sum(t.output_tokens for t in timings)
    gaps = [g for t in timings for g in t.gaps_s]
    ttfts = [t.ttft_s for t in timings]
    return LoadResult(
        len(timings),
        concurrency,
        wall,
        tokens,
        tokens / wall,
        len(timings) / wall,
        _percentile(ttfts, 0.5),
        _percentile(ttfts, 0.99),
        _percentile(gaps, 0.5),
        _percentile(gaps, 0.99),
    )


def wait_ready(host: str, port: int, seconds: float) -> bool:
    """Poll ``GET /health`` until it answers 200 (True) or ``seconds`` pass (False)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection(host, port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return True
        except OSError:
            pass
        time.sleep(1.0)
    return False
