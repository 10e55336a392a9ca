"""The kvpress peer: NVIDIA kvpress's presses on the bench's own contexts, questions and budgets.

kvpress pins an older transformers than kvmem's, so it lives in its own virtual environment
(``.venv-peers``, made by ``make bench-peers``; ``$KVMEM_PEERS_VENV`` overrides where) and runs
there as a subprocess: ``kvpress_worker.py`` (which documents the job and its output) loads the
same model folder once and answers every item. kvmem's install never depends on it.

A budget (a share of kvmem's full cache for the context) becomes kvpress's ``compression_ratio =
1 - share``, so ``Record.budget`` is the nominal compression; ``kv_bytes`` is what the cache's
tensors really held, and ``kv_ratio`` that over the bench's full bytes. A press that only masks
(AdaKV) holds every token, and its records say so. In ``multiturn`` the context is compressed once
and the questions follow it, as kvmem's runs; in ``single`` / ``multirequest`` each prompt (context
+ question) is compressed whole. Real text: the continuation's log-probability, perplexity and KL
against kvmem's full cache (the worker saves its log-probabilities beside its results; they are
read before its folder goes).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from kvmem.bench import kvpress_worker
from kvmem.bench.config import KVPRESS
from kvmem.bench.example import Context
from kvmem.bench.kvmem_runner import answer_length
from kvmem.bench.record import Record
from kvmem.bench.scoring import score
from kvmem.engine.llm import LLM
from kvmem.errors import KVMemError
from kvmem.model.loader import resolve_model_folder

NOT_INSTALLED = "kvpress peer not installed: run `make bench-peers`"
WORKER = Path(kvpress_worker.__file__)
_REPO = Path(__file__).resolve().parents[3]  # src/kvmem/bench/ -> the checkout, for `make bench-peers`


class PeerError(KVMemError):
    """The kvpress worker failed, timed out or wrote no readable results."""


class Item(NamedTuple):
    """One question of one context, under one press and budget: one record."""

    id: int
    conversation: int  # items of one conversation share one compressed cache, in order
    context: Context
    question: int
    press: str
    share: float


def peer_python() -> Path:
    """The peer venv's python: ``$KVMEM_PEERS_VENV``, else ``.venv-peers`` in the checkout or here."""
    env = os.environ.get("KVMEM_PEERS_VENV")
    venvs = [Path(env)] if env else [_REPO / ".venv-peers", Path.cwd() / ".venv-peers"]
    pythons = [v / "bin" / "python" for v in venvs]
    return next((p for p in pythons if p.is_file()), pythons[0])


def available() -> bool:
    """Whether the peer venv exists and holds kvpress (found, not imported: that takes seconds)."""
    python = peer_python()
    if not python.is_file():
        return False
    check = "import importlib.util, sys; sys.exit(importlib.util.find_spec('kvpress') is None)"
    try:
        done = subprocess.run([str(python), "-c", check], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def plan_items(
    contexts: Sequence[Context], presses: Sequence[str], budgets: Sequence[float], mode: str
) -> list[Item]:
    """Every (press, budget, context, question), in the order the bench reports them."""
    items: list[Item] = []
    conversation = 0
    for press in presses:
        for share in budgets:
            for context in contexts:
                for question in range(len(context.questions)):
                    items.append(Item(len(items), conversation, context, question, press, share))
                    if mode != "multiturn":
                        conversation += 1
                if mode == "multiturn":
                    conversation += 1
    return items


def _job_item(item: Item, llm: LLM, mode: str) -> dict[str, Any]:
    context, question = item.context, item.context.questions[item.question]
    text, asked = context.text, question.question
    if mode != "multiturn":  # as kvmem's single mode: the whole prompt is prefilled and compressed
        text, asked = context.text + question.question, ""
    return {
        "id": item.id,
        "conversation": item.conversation,
        "context": text,
        "question": asked,
        "answer": question.answer,
        "max_new_tokens": 0 if context.kind == "text" else answer_length(llm, question),
        "logp": context.kind == "text",
        "press": item.press,
        "compression_ratio": round(1.0 - item.share, 9),
    }


def make_job(
    items: Sequence[Item], llm: LLM, model_folder: Path, mode: str, threads: int | None
) -> dict[str, Any]:
    """The worker's job (schema in ``kvpress_worker``); ``llm`` gives the answer lengths."""
    return {
        "schema": kvpress_worker.SCHEMA,
        "model": str(model_folder),
        "threads": threads,
        "items": [_job_item(item, llm, mode) for item in items],
    }


def run_worker(job: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    """Run the worker in the peer venv on ``job``; its output. Raises ``PeerError``."""
    with tempfile.TemporaryDirectory(prefix="kvmem-kvpress-") as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(job))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        command = [str(peer_python()), str(WORKER), str(job_path), str(out_path)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise PeerError(f"kvpress worker timed out after {timeout:.0f} s") from None
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or ["no message"]
            raise PeerError(f"kvpress worker failed (exit {done.returncode}): {tail[0]}")
        try:
            out: dict[str, Any] = json.loads(out_path.read_text())
            for result in out.get("results", ()):
                if "logp_file" in result:  # read before the folder goes
                    path = Path(tmp) / Path(str(result.pop("logp_file"))).name
                    result["logp"] = torch.load(path, weights_only=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise PeerError(f"kvpress worker wrote no readable results: {e}") from None
    if out.get("schema") != kvpress_worker.SCHEMA or len(out.get("results", ())) != len(job["items"]):
        raise PeerError("kvpress worker's results do not match its job")
    return out


def to_records(
    items: Sequence[Item],
    results: Sequence[Mapping[str, Any]],
    full_bytes: Mapping[str, int],
    mode: str,
    references: Mapping[str, torch.Tensor] | None = None,
) -> list[Record]:
    """One ``Record`` per item from the worker's results (same order); ``full_bytes`` and the full
    cache's real-text log-probabilities ``references`` ([N, V]) by "task/seed"."""
    records = []
    for item, result in zip(items, results, strict=True):
        if result.get("id") != item.id:
            raise PeerError(f"kvpress result {result.get('id')} answers item {item.id}")
        if result.get("error"):
            records.append(error_record(item, mode, str(result["error"])))
            continue
        context = item.context
        key = f"{context.task}/{_seed(context)}"
        full = full_bytes.get(key) or int(result["full_context_bytes"])
        held, output = int(result["held_bytes"]), str(result["output"])
        text = context.kind == "text"
        logprob = float(result["gold_logprob"])
        reference, logp = (references or {}).get(key), result.get("logp")
        kl = None
        if text and reference is not None and logp is not None and logp.shape == reference.shape:
            kl = float((reference.exp() * (reference - logp)).sum(-1).mean())
        records.append(
            Record(
                method=KVPRESS + item.press,
                budget=item.share,
                task=context.task,
                mode=mode,
                context=_seed(context),
                question=item.question,
                prompt_tokens=int(result["prompt_tokens"]),
                score=None if text else score(context.examples[item.question], output),
                gold_logprob=logprob,
                ppl=math.exp(-logprob) if text else None,
                kl=kl,
                kv_bytes=held,
                kv_ratio=held / full,
                prefill_s=float(result["prefill_s"]),
                ttft_s=float(result["prefill_s"]),
                decode_tokens_per_s=float(result["decode_tokens_per_s"]),
                peak_rss=int(result.get("peak_rss", 0)),  # the worker's own growth
                output=output,
            )
        )
    return records


def error_record(item: Item, mode: str, why: str) -> Record:
    return Record.refused(
        KVPRESS + item.press, item.share, item.context.task, mode, _seed(item.context), item.question, why
    )


def run_kvpress(
    llm: LLM,
    model: str,
    contexts: Sequence[Context],
    presses: Sequence[str],
    budgets: Sequence[float],
    full_bytes: Mapping[str, int],
    mode: str,
    threads: int | None = None,
    timeout: float | None = None,
    references: Mapping[str, torch.Tensor] | None = None,
) -> list[Record]:
    """Records for every press, budget, context and question; ``error`` set on those that could not
    run (the peer venv missing, a model folder kvpress cannot load, a failing worker or item).

    ``model``: an embedded name, folder or ``.gguf`` (the folder kvmem loads is handed over);
    ``llm``: the same model in kvmem, for the answer lengths; ``timeout`` defaults to 10 minutes
    plus 2 per conversation."""
    presses = [p.removeprefix(KVPRESS) for p in presses]
    items = plan_items(contexts, presses, budgets, mode)
    if not items:
        return []
    try:
        if not available():
            raise PeerError(NOT_INSTALLED)
        job = make_job(items, llm, resolve_model_folder(model), mode, threads)
        conversations = len({item.conversation for item in items})
        out = run_worker(job, timeout if timeout is not None else 600 + 120 * conversations)
        return to_records(items, out["results"], full_bytes, mode, references)
    except KVMemError as e:
        return [error_record(item, mode, str(e)) for item in items]


def _seed(context: Context) -> int:
    return int(str(context.meta.get("seed", 0)))
