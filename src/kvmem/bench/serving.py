"""Many requests under one KV budget, and one request's decode speed: kvmem beside its peers.

Measurement code only (the scenario, its sizes and the results folder are ``scripts/engine_bench.py``):

- ``decode_speed``: one request, its prompt prefilled, then ``new_tokens`` greedy steps timed,
  for kvmem (a policy or the full cache) or transformers (its own forward with ``DynamicCache``);
- ``kvmem_throughput``: every prompt added to one ``Engine`` at once, stepped to the end; output
  tokens/s, requests/s, the most sequences running at once, the pool's peak bytes, the process's
  peak resident memory above its start, TTFT percentiles, preemptions;
- ``hf_throughput``: the same prompts through transformers' continuous batching
  (``generate_batch``), its paged cache sized to the same budget.

Every request generates exactly ``new_tokens`` (end-of-sequence ignored), as load generators do,
so the systems do the same work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pydoc_data.topics import topics

import torch
from transformers import DynamicCache, GenerationConfig

from kvmem.bench.memory import PeakRSS
from kvmem.engine.config import EngineConfig
from kvmem.engine.engine import Engine
from kvmem.engine.llm import LLM
from kvmem.model.cache_arg import cache_kwargs
from kvmem.model.loader import LoadedModel


@dataclass(frozen=True)
class DecodeSpeed:
    method: str
    dtype: str
    prompt_tokens: int
    tokens_per_s: float
    kv_bytes: int  # held after the prompt (kvmem: the pool's blocks; transformers: its cache tensors)


@dataclass(frozen=True)
class Throughput:
    method: str
    requests: int
    prompt_tokens: int  # per request
    new_tokens: int  # per request
    budget: int  # bytes of KV the system may hold
    wall_s: float
    output_tokens_per_s: float
    requests_per_s: float
    max_running: int | None  # most sequences decoding at once (None: the system does not say)
    peak_kv_bytes: int | None  # the pool's peak (None: not measured by the system)
    peak_rss_growth: int  # the process's peak resident bytes above its start
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    preemptions: int | None


@torch.inference_mode()
def decode_speed(loaded: LoadedModel, ids: list[int], method: str, new_tokens: int) -> DecodeSpeed:
    """``method``: "hf" (transformers' own forward and DynamicCache), "full" or a kvmem policy."""
    dtype = str(loaded.spec.dtype).removeprefix("torch.")
    if method == "hf":
        cache = DynamicCache(config=loaded.model.config)
        model = loaded.model
        out = model(torch.tensor([ids], device=model.device), **cache_kwargs(model, cache))
        token = out.logits[0, -1].argmax().view(1, 1)
        layers = [(layer.keys, layer.values) for layer in cache.layers]  # type: ignore[union-attr]
        kv = sum(int(k.nbytes) + int(v.nbytes) for k, v in layers if k is not None and v is not None)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(token, **cache_kwargs(model, cache))
            token = out.logits[0, -1].argmax().view(1, 1)
        return DecodeSpeed(method, dtype, len(ids), new_tokens / (time.perf_counter() - start), kv)
    llm = LLM(loaded, policy=None if method == "full" else method)
    seq = llm.new_sequence()
    seq.token_ids = list(ids)
    try:
        logits = seq.prefill(512)
        kv = seq.cache.nbytes
        start = time.perf_counter()
        for _ in range(new_tokens):
            logits = seq.step(int(logits.argmax()))
        return DecodeSpeed(method, dtype, len(ids), new_tokens / (time.perf_counter() - start), kv)
    finally:
        seq.release()
        llm.engine.close()


def token_slices(loaded: LoadedModel, n: int, length: int) -> list[list[int]]:
    """``n`` distinct prompts of exactly ``length`` tokens: consecutive slices of Python's reference
    documentation (``pydoc_data.topics``, offline), wrapping around; no two share a prefix."""
    text = "\n\n".join(topics[key].strip() for key in sorted(topics))
    ids = list(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
    need = n * length
    ids = (ids * -(-need // len(ids)))[:need]
    bos = loaded.tokenizer("", add_special_tokens=True)["input_ids"][:1]  # the BOS a prompt starts with
    return [bos + ids[i * length : (i + 1) * length - len(bos)] for i in range(n)]


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def kvmem_throughput(
    loaded: LoadedModel,
    prompts: list[list[int]],
    new_tokens: int,
    budget: int,
    policy: str | None,
    max_num_seqs: int = 32,
    reserve_new_tokens: int | None = None,
) -> Throughput:
    """Every prompt added at once to one engine over a pool of ``budget`` bytes, run to the end."""
    config = EngineConfig(
        model=loaded.name,
        kv_budget=budget,
        policy=policy,
        max_num_seqs=max_num_seqs,
        max_batch_tokens=max(1024, max_num_seqs),
        reserve_new_tokens=reserve_new_tokens,
    )
    engine = Engine(loaded, config)
    peak_kv, ttfts = 0, []
    with PeakRSS() as rss:
        start = time.perf_counter()
        ids = [engine.add_request(p, new_tokens, ignore_eos=True) for p in prompts]
        while engine.has_unfinished:
            for output in engine.step():
                if output.finished and output.result is not None:
                    ttfts.append(output.result.stats.ttft_s)
                elif output.error is not None:
                    raise output.error
            peak_kv = max(peak_kv, engine.pool.bytes_used)
        wall = time.perf_counter() - start
    stats = engine.scheduler.stats
    engine.close()
    return Throughput(
        policy or "full",
        len(ids),
        len(prompts[0]),
        new_tokens,
        budget,
        wall,
        len(ids) * new_tokens / wall,
        len(ids) / wall,
        stats.peak_running,
        peak_kv,
        rss.growth,
        _percentile(ttfts, 0.5),
        _percentile(ttfts, 0.99),
        stats.preemptions,
    )


@torch.inference_mode()
def hf_throughput(
    loaded: LoadedModel, prompts: list[list[int]], new_tokens: int, budget: int, page_size: int = 64
) -> Throughput:
    """The prompts through transformers' ``generate_batch``, its paged cache holding ``budget`` bytes."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    blocks = max(1, budget // (page_size * loaded.spec.kv_bytes_per_token))
    generation = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = ContinuousBatchingConfig(num_blocks=blocks, page_size=page_size, max_batch_tokens=1024)
    before = loaded.model.config._attn_implementation
    loaded.model.set_attn_implementation("sdpa")  # its continuous batching takes transformers' own
    try:
        with PeakRSS() as rss:
            start = time.perf_counter()
            outputs = loaded.model.generate_batch(  # type: ignore[operator]
                prompts, generation_config=generation, continuous_batching_config=batching
            )
            wall = time.perf_counter() - start
    finally:
        loaded.model.set_attn_implementation(before)
    made = sum(len(out.generated_tokens) for out in outputs.values())
    return Throughput(
        "hf-generate_batch",
        len(prompts),
        len(prompts[0]),
        new_tokens,
        blocks * page_size * loaded.spec.kv_bytes_per_token,
        wall,
        made / wall,
        len(outputs) / wall,
        None,
        None,
        rss.growth,
        None,
        None,
        None,
    )


def describe(result: Throughput) -> str:
    ttft = "" if result.ttft_p50_s is None else f", TTFT p50 {result.ttft_p50_s:.1f} s"
    running = "" if result.max_running is None else f", up to {result.max_running} at once"
    return (
        f"{result.method}: {result.output_tokens_per_s:.1f} output tok/s, {result.requests_per_s:.3f} req/s"
        f"{running}{ttft} ({result.wall_s:.0f} s)"
    )
