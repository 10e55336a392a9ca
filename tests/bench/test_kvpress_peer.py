"""The kvpress peer without kvpress: the job it writes, its results as records, and a bench run that
says how to install it. One test runs the worker for real, where ``make bench-peers`` was run."""

from __future__ import annotations

import ast
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from kvmem.bench import kvpress_worker, make_task
from kvmem.bench.cli import config_from
from kvmem.bench.config import BenchConfig, suite
from kvmem.bench.example import Context
from kvmem.bench.kvmem_runner import answer_length
from kvmem.bench.kvpress_peer import (
    NOT_INSTALLED,
    Item,
    available,
    make_job,
    plan_items,
    run_worker,
    to_records,
)
from kvmem.bench.report import markdown
from kvmem.bench.run import can_evict, plan, run_bench
from kvmem.cli import build_parser
from kvmem.engine.llm import LLM
from kvmem.model.loader import LoadedModel
from tiny_models import save_folder

JOB_KEYS = {"schema", "model", "threads", "items"}
ITEM_KEYS = {
    "id", "conversation", "context", "question", "answer", "max_new_tokens", "press", "compression_ratio",
    "logp",
}  # fmt: skip
RESULT_KEYS = {
    "id", "output", "gold_logprob", "held_bytes", "attended_bytes", "full_context_bytes", "context_tokens",
    "kept_tokens", "compression_ratio", "prefill_s", "decode_tokens_per_s", "prompt_tokens", "peak_rss",
}  # fmt: skip


@pytest.fixture(scope="module")
def llm(llama: LoadedModel) -> LLM:
    return LLM(llama, block_size=16, prefill_chunk=64)


@pytest.fixture(scope="module")
def contexts(llm: LLM) -> list[Context]:
    return [make_task(t).make_context(llm, 1024, 0) for t in ("multikey", "realtext")]  # never run


def test_job_has_the_documented_schema(llm: LLM, contexts: list[Context]) -> None:
    items = plan_items(contexts, ["snapkv", "adakv"], [0.5, 0.25], "multiturn")
    job = json.loads(json.dumps(make_job(items, llm, Path("/models/m"), "multiturn", 2)))
    assert set(job) == JOB_KEYS and job["schema"] == kvpress_worker.SCHEMA and job["model"] == "/models/m"
    per_run = len(contexts[0].questions) + 1  # multikey's questions, then realtext's continuation
    assert len(job["items"]) == 2 * 2 * per_run
    assert [i["id"] for i in job["items"]] == list(range(len(items)))
    for item, sent in zip(items, job["items"]):
        assert set(sent) == ITEM_KEYS and sent["press"] == item.press
        assert sent["compression_ratio"] == pytest.approx(1 - item.share)
        question = item.context.questions[item.question]
        assert sent["context"] == item.context.text and sent["question"] == question.question
        assert sent["answer"] == question.answer
        text = item.context.kind == "text"
        assert sent["max_new_tokens"] == (0 if text else answer_length(llm, question))
    # multiturn: one conversation (one compressed cache) per press, budget and context
    conversations = {(i.press, i.share, i.context.task): i.conversation for i in items}
    assert len(set(conversations.values())) == len(conversations) == 2 * 2 * 2


def test_single_mode_compresses_each_whole_prompt(llm: LLM, contexts: list[Context]) -> None:
    items = plan_items(contexts[:1], ["knorm"], [0.5], "single")
    job = make_job(items, llm, Path("/m"), "single", None)
    assert len({i.conversation for i in items}) == len(items) == len(contexts[0].questions)
    for item, sent in zip(items, job["items"]):
        assert sent["context"] == contexts[0].text + contexts[0].questions[item.question].question
        assert sent["question"] == ""


def _fake_results(items: list[Item], held: int, fail_last: bool = True) -> list[dict[str, object]]:
    """What the worker writes: even questions answered right, the last item failed."""
    results: list[dict[str, object]] = []
    for item in items:
        question = item.context.questions[item.question]
        right = item.question % 2 == 0
        results.append(
            {
                "id": item.id,
                "output": question.answer if right else " nothing",
                "gold_logprob": -0.5,
                "held_bytes": held,
                "attended_bytes": held // 2,
                "full_context_bytes": 4 * held,
                "context_tokens": 300,
                "kept_tokens": 150,
                "compression_ratio": 1 - item.share,
                "prefill_s": 0.25,
                "decode_tokens_per_s": 40.0,
                "prompt_tokens": 310,
                "peak_rss": 2**20,
            }
        )
    if fail_last:
        results[-1] = {"id": items[-1].id, "error": "kvpress: RuntimeError: boom"}
    return results


def test_results_become_records(contexts: list[Context]) -> None:
    items = plan_items(contexts, ["snapkv"], [0.25], "multiturn")
    results = _fake_results(items, held=1000)
    assert set(results[0]) == RESULT_KEYS
    full_bytes = {"multikey/0": 8000}  # realtext's is missing: the worker's full context stands in
    records = to_records(items, results, full_bytes, "multiturn")
    assert len(records) == len(items)
    assert {r.method for r in records} == {"kvpress:snapkv"} and {r.budget for r in records} == {0.25}
    ok = [r for r in records if r.error is None]
    assert len(ok) == len(items) - 1 and records[-1].error == "kvpress: RuntimeError: boom"
    for record, item in zip(ok, items):
        assert (record.task, record.question, record.mode) == (item.context.task, item.question, "multiturn")
        assert record.kv_bytes == 1000 and record.decode_tokens_per_s == 40.0 and record.ttft_s == 0.25
        assert record.peak_rss == 2**20 and record.prompt_tokens == 310
        if record.task == "multikey":
            assert record.kv_ratio == 1000 / 8000
            assert record.score == (1.0 if item.question % 2 == 0 else 0.0)
    assert records[-1].task == "realtext" and math.isnan(records[-1].gold_logprob)
    with pytest.raises(Exception, match="answers item"):
        to_records(items, list(reversed(results)), full_bytes, "multiturn")


def test_real_text_records_carry_perplexity_and_kl_against_the_full_cache(contexts: list[Context]) -> None:
    items = plan_items(contexts[1:], ["knorm"], [0.5], "multiturn")
    results = _fake_results(items, held=500, fail_last=False)
    (record,) = to_records(items, results, {}, "multiturn")
    assert record.score is None and record.kl is None and record.ppl == pytest.approx(math.exp(0.5))
    assert record.kv_ratio == 500 / 2000
    # with the worker's log-probabilities and the full cache's: their KL, as for kvmem's methods
    reference = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]), dim=-1)
    logp = torch.log_softmax(torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]]), dim=-1)
    results[0]["logp"] = logp
    (record,) = to_records(items, results, {}, "multiturn", {"realtext/0": reference})
    expected = float((reference.exp() * (reference - logp)).sum(-1).mean())
    assert record.kl == pytest.approx(expected) and record.kl > 0


def test_config_and_cli_accept_kvpress_names() -> None:
    config = BenchConfig(methods=("full", "kvpress:snapkv", "kvpress:adakv"))
    assert can_evict("kvpress:snapkv")
    assert all(not m.startswith("kvpress:") for m, _ in plan(config))
    with pytest.raises(ValueError, match="unknown kvpress press 'kvpress:nope'"):
        BenchConfig(methods=("full", "kvpress:nope"))
    full, quick = suite("full", "smollm2-135m"), suite("quick", "smollm2-135m")
    assert {"kvpress:snapkv", "kvpress:expected_attention", "kvpress:tova"} <= set(full.methods)
    assert not any(m.startswith("kvpress:") for m in quick.methods)
    args = build_parser().parse_args(["bench", "--methods", "full,kvpress:tova", "--block-size", "32"])
    assert config_from(args).methods == ("full", "kvpress:tova")
    assert config_from(args).block_size == 32


def test_worker_imports_no_kvmem_and_only_the_standard_library_at_module_level() -> None:
    tree = ast.parse(Path(kvpress_worker.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        assert not any(n.split(".")[0] == "kvmem" for n in names)
        if node in tree.body:
            assert all(n.split(".")[0] in sys.stdlib_module_names | {"__future__"} for n in names)


def test_without_the_peer_venv_the_bench_says_how_to_install_it(
    llama: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVMEM_PEERS_VENV", str(tmp_path / "no-venv"))
    assert not available()
    config = BenchConfig(
        model="tiny",
        methods=("full", "kvpress:snapkv"),
        budgets=(0.5, 0.25),
        tasks=("passkey",),
        length=320,
        block_size=16,
        prefill_chunk=64,
        speed_lengths=(64,),
        speed_tokens=3,
    )
    result = run_bench(config, model=llama, progress=False)
    peer = [r for r in result.records if r.method == "kvpress:snapkv"]
    assert [r.budget for r in peer] == [0.5, 0.25]
    assert all(r.error == NOT_INSTALLED for r in peer)
    assert f"refused: {NOT_INSTALLED}" in markdown(result)
    assert {s.method for s in result.speed} == {"full"}


@pytest.mark.skipif(not available(), reason="no kvpress peer venv (make bench-peers)")
def test_worker_runs_kvpress_for_real(llama: LoadedModel, llm: LLM, tmp_path: Path) -> None:
    """A tiny model through the real worker: a press that evicts holds fewer bytes than the full
    context; AdaKV, which only masks, holds every one of them.

    Single mode: AdaKV hides a key behind a fake key that no query of a forward may reach, and for
    the random queries of a tiny model a question's many tokens leave no such key to find."""
    folder = save_folder(llama, tmp_path / "tiny")
    context = make_task("passkey").make_context(llm, 320, 0)
    items = plan_items([context], ["snapkv", "adakv"], [0.25], "single")
    out = run_worker(make_job(items, llm, folder, "single", 1), timeout=300)
    snapkv, adakv = out["results"]
    assert set(snapkv) == RESULT_KEYS and set(out["versions"]) == {"kvpress", "transformers", "torch"}
    full = snapkv["full_context_bytes"]
    assert snapkv["kept_tokens"] == int(snapkv["context_tokens"] * 0.25)
    assert snapkv["held_bytes"] < 0.6 * full and snapkv["attended_bytes"] == snapkv["held_bytes"]
    assert adakv["kept_tokens"] == adakv["context_tokens"] and adakv["held_bytes"] > full
    assert adakv["attended_bytes"] == snapkv["held_bytes"]  # what the nominal ratio promises
    records = to_records(items, out["results"], {}, "single")
    assert [r.method for r in records] == ["kvpress:snapkv", "kvpress:adakv"]
    assert all(r.error is None and r.score is not None for r in records)
    # real text: the worker's log-probabilities come back through a file, one row per token
    text = make_task("realtext").make_context(llm, 320, 0)
    items = plan_items([text], ["snapkv"], [0.5], "multiturn")
    (result,) = run_worker(make_job(items, llm, folder, "multiturn", 1), timeout=300)["results"]
    gold = llm.encode(text.questions[0].answer)
    assert result["logp"].shape == (len(gold), llama.model.config.vocab_size)
    mean = float(result["logp"].gather(1, torch.tensor(gold)[:, None]).mean())
    assert mean == pytest.approx(result["gold_logprob"], abs=1e-5)
