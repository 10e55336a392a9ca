"""``run_bench``: every (method, budget) over every task context, the full cache first.

The full cache runs first on each context: its bytes set the budgets (``0.25`` of them, …) and its
real-text distributions are the reference for KL. Methods that cannot evict run once, unbudgeted.
A budget a method cannot meet (e.g. Gemma's sliding layers already hold more) gives a record with
``error`` set instead of a crash.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import transformers
from tqdm import tqdm

from kvmem.bench.config import FULL, BenchConfig, is_hf, is_kvpress, split_method
from kvmem.bench.example import Context
from kvmem.bench.hf_peer import run_questions_hf, run_text_hf
from kvmem.bench.kvmem_runner import Request, end_of_sequence, run_questions, run_text
from kvmem.bench.kvpress_peer import run_kvpress
from kvmem.bench.record import Record, SpeedPoint
from kvmem.bench.registry import make_task
from kvmem.compress.budget import KVBudget
from kvmem.compress.registry import make_policy
from kvmem.engine.llm import LLM
from kvmem.errors import KVMemError
from kvmem.model.loader import LoadedModel, load_model
from kvmem.prefix.cache import can_share


@dataclass
class BenchResult:
    config: BenchConfig
    records: list[Record] = field(default_factory=list)
    speed: list[SpeedPoint] = field(default_factory=list)
    full_bytes: dict[str, int] = field(default_factory=dict)  # "task/seed" -> bytes
    environment: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "config": asdict(self.config),
            "environment": self.environment,
            "full_bytes": self.full_bytes,
            "records": [r.to_dict() for r in self.records],
            "speed": [s.to_dict() for s in self.speed],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchResult:
        """Read back what ``to_dict`` wrote (``results.json``), e.g. to redraw its table and plots."""
        config: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in data["config"].items()
        }
        return cls(
            config=BenchConfig(**config),
            records=[Record(**r) for r in data["records"]],
            speed=[SpeedPoint(**s) for s in data["speed"]],
            full_bytes=dict(data["full_bytes"]),
            environment=dict(data.get("environment", {})),
        )


def can_evict(method: str) -> bool:
    """Whether a method takes a budget (it has an eviction scorer)."""
    if method == FULL or is_hf(method):
        return False
    if is_kvpress(method):  # kvpress peer: every press takes a compression ratio
        return True
    policy = make_policy(split_method(method)[0], KVBudget.parse("1GiB"))
    return policy.bounds


def plan(config: BenchConfig) -> list[tuple[str, float | None]]:
    """(method, budget share) pairs, the full cache first. kvpress peers are not among them: they run
    apart, after these, in their own process (``kvmem.bench.kvpress_peer``)."""
    runs: list[tuple[str, float | None]] = [(FULL, None)]
    for method in config.methods:
        if method == FULL or is_kvpress(method):
            continue
        if can_evict(method):
            runs += [(method, b) for b in config.budgets]
        else:
            runs.append((method, None))
    return runs


def make_contexts(config: BenchConfig, llm: LLM) -> list[Context]:
    return [
        make_task(task).make_context(llm, config.length, config.seed + i)
        for task in config.tasks
        for i in range(config.contexts)
    ]


def _key(context: Context) -> str:
    return f"{context.task}/{context.meta.get('seed', 0)}"


def run_bench(
    config: BenchConfig,
    model: LoadedModel | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> BenchResult:
    started = time.time()
    loaded = model if model is not None else load_model(config.model)
    base = LLM(loaded, block_size=config.block_size, prefill_chunk=config.prefill_chunk)
    contexts = make_contexts(config, base)
    result = BenchResult(config)
    references: dict[str, torch.Tensor] = {}
    runs = plan(config)
    bar = tqdm(total=len(runs) * len(contexts), desc="kvmem bench", unit="run", disable=not progress)
    for method, share in runs:
        for context in contexts:
            key = _key(context)
            full = result.full_bytes.get(key, 0)
            request = Request(method, share, config.mode, full or 1)
            bar.set_postfix_str(f"{method} {'' if share is None else f'{share:.0%} '}{context.task}")
            try:
                result.records += _run_one(config, loaded, context, request, references)
            except KVMemError as e:
                result.records.append(_refused(context, request, str(e)))
            if method == FULL:  # its bytes are the reference: now its own ratios can be known
                full = max(r.kv_bytes for r in result.records if _is(r, FULL, context))
                result.full_bytes[key] = full
                result.records = [
                    replace(r, kv_ratio=r.kv_bytes / full) if _is(r, FULL, context) else r
                    for r in result.records
                ]
            bar.update()
    bar.close()
    # --- kvpress peer: after kvmem's methods, so that the full cache's bytes are known
    presses = [m for m in config.methods if is_kvpress(m)]
    if presses:
        peer = tqdm(total=1, desc="kvpress peer (its own venv)", unit="job", disable=not progress)
        threads = torch.get_num_threads()
        result.records += run_kvpress(
            base,
            config.model,
            contexts,
            presses,
            config.budgets,
            result.full_bytes,
            config.mode,
            threads,
            references=references,
        )
        peer.update()
        peer.close()
    # --- end kvpress peer
    result.speed = measure_speed(config, loaded, runs, progress)
    result.environment = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "dtype_bits": loaded.spec.element_size * 8,  # the full cache's bits per element
        "machine": platform.machine(),
        "seconds": round(time.time() - started, 1),
        "date": time.strftime("%Y-%m-%d"),
    }
    return result


def _is(record: Record, method: str, context: Context) -> bool:
    return record.method == method and record.task == context.task and record.context == _seed(context)


def _seed(context: Context) -> int:
    return int(str(context.meta.get("seed", 0)))


def _llm(
    config: BenchConfig, loaded: LoadedModel, method: str, budget_bytes: int | None, full_bytes: int
) -> LLM:
    policy, after_prompt = (None, False) if method == FULL or is_hf(method) else split_method(method)
    # compressing after the prompt: its peak holds the whole context at full size (the full cache's
    # bytes for it, with room for the answer)
    peak = 2 * full_bytes if after_prompt and budget_bytes is not None else None
    shares = config.mode == "multirequest" and can_share(
        None if policy is None else make_policy(policy, KVBudget.parse(budget_bytes))
    )
    return LLM(
        loaded,
        kv_budget=budget_bytes,
        block_size=config.block_size,
        prefill_chunk=config.prefill_chunk,
        policy=policy,
        prefix_cache=shares,  # multi-request: later requests adopt the shared context's blocks
        compress_after_prompt=peak,
    )


def _run_one(
    config: BenchConfig,
    loaded: LoadedModel,
    context: Context,
    request: Request,
    references: dict[str, torch.Tensor],
) -> list[Record]:
    budget = None if request.budget is None else int(request.budget * request.full_bytes)
    llm = _llm(config, loaded, request.method, budget, request.full_bytes)
    if context.kind == "text":
        if is_hf(request.method):
            return run_text_hf(llm, context, request, references.get(_key(context)))
        record, logp = run_text(llm, context, request, references.get(_key(context)))
        if request.method == FULL:
            references[_key(context)] = logp
        return [record]
    if is_hf(request.method):
        return run_questions_hf(llm, context, request)
    return run_questions(llm, context, request)


def _refused(context: Context, request: Request, why: str) -> Record:
    return Record.refused(request.method, request.budget, context.task, request.mode, _seed(context), 0, why)


@torch.inference_mode()
def measure_speed(
    config: BenchConfig, loaded: LoadedModel, runs: list[tuple[str, float | None]], progress: bool
) -> list[SpeedPoint]:
    """Decode tokens/s at each of ``config.speed_lengths``, for each method at its smallest budget."""
    if not config.speed_lengths:
        return []
    smallest = min(config.budgets)
    chosen = [(m, b) for m, b in runs if not is_hf(m) and (b is None or b == smallest)]
    base = LLM(loaded, block_size=config.block_size, prefill_chunk=config.prefill_chunk)
    text = make_task("realtext").make_context(base, max(config.speed_lengths), config.seed).text
    all_ids = base.encode(text)
    eos = end_of_sequence(base)
    points = []
    bar = tqdm(total=len(chosen) * len(config.speed_lengths), desc="decode speed", disable=not progress)
    for length in config.speed_lengths:
        ids = all_ids[:length]
        full_bytes = 0  # set by the full cache, which runs first
        for method, share in chosen:
            budget = None if share is None else int(share * full_bytes)
            llm = _llm(config, loaded, method, budget, full_bytes)
            seq = llm.new_sequence()
            seq.token_ids = list(ids)
            try:
                logits = seq.prefill(config.prefill_chunk)
                start = time.perf_counter()
                for _ in range(config.speed_tokens):
                    token = int(logits.argmax())
                    logits = seq.step(token if token not in eos else ids[0])
                seconds = time.perf_counter() - start
                full_bytes = full_bytes or seq.cache.nbytes
                speed = config.speed_tokens / seconds
                points.append(SpeedPoint(method, share, length, speed, seq.cache.nbytes))
            except KVMemError:
                pass  # the budget is below what the method needs at this length; nothing to time
            finally:
                seq.release()
            bar.update()
    bar.close()
    return points
