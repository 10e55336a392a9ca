"""A tiny end-to-end bench: the results folder has the documented schema, budgets hold, and the full
cache through kvmem answers exactly as transformers' own generate."""

import json
from pathlib import Path

import pytest

from kvmem.bench.config import BenchConfig
from kvmem.bench.report import ACCURACY_PNG, PARETO_PNG, RESULTS_JSON, RESULTS_MD, SPEED_PNG, frontier, write
from kvmem.bench.run import BenchResult, run_bench
from kvmem.compress.bits import block_bits
from kvmem.compress.kivi import KIVI
from kvmem.model.loader import LoadedModel

CONFIG = BenchConfig(
    model="tiny",
    methods=("full", "hf", "hf-quanto4", "snapkv", "snapkv@prompt", "kivi4"),
    budgets=(0.5,),
    tasks=("passkey", "realtext"),
    length=320,
    block_size=16,
    prefill_chunk=64,
    speed_lengths=(64,),
    speed_tokens=3,
)
RECORD_KEYS = {
    "method", "budget", "task", "mode", "context", "question", "prompt_tokens", "score", "gold_logprob",
    "ppl", "kl", "kv_bytes", "kv_ratio", "prefill_s", "ttft_s", "decode_tokens_per_s", "peak_rss",
    "output", "tokens_reused", "error",
}  # fmt: skip


@pytest.fixture(scope="module")
def result(llama: LoadedModel) -> BenchResult:
    return run_bench(CONFIG, model=llama, progress=False)


def test_results_folder_has_json_table_and_plots(result: BenchResult, tmp_path: Path) -> None:
    paths = write(result, tmp_path)
    assert {p.name for p in paths} == {RESULTS_JSON, RESULTS_MD, ACCURACY_PNG, PARETO_PNG, SPEED_PNG}
    data = json.loads((tmp_path / RESULTS_JSON).read_text())
    assert set(data) == {"config", "environment", "full_bytes", "records", "speed", "summary"}
    assert data["config"]["methods"] == list(CONFIG.methods) and data["config"]["seed"] == 0
    assert all(set(r) == RECORD_KEYS for r in data["records"])
    runs = {(r["method"], r["budget"]) for r in data["records"]}
    assert runs == {
        ("full", None), ("hf", None), ("hf-quanto4", None), ("snapkv", 0.5), ("snapkv@prompt", 0.5),
        ("kivi4", None),
    }  # fmt: skip
    assert {s["method"] for s in data["speed"]} == {"full", "snapkv", "snapkv@prompt", "kivi4"}
    table = (tmp_path / RESULTS_MD).read_text()
    assert "| method | budget | passkey |" in table and "| ratio | bits/el |" in table
    full_row = next(line for line in table.splitlines() if line.startswith("| `full` |"))
    assert "| 1.00 | 32.00 |" in full_row  # the tiny model is float32: 32 bits per element
    for method in CONFIG.methods:
        assert f"| `{method}` |" in table
    for png in (ACCURACY_PNG, PARETO_PNG, SPEED_PNG):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_budgets_hold_and_ratios_are_against_the_full_cache(result: BenchResult, llama: LoadedModel) -> None:
    for r in result.records:
        assert r.error is None
        full = result.full_bytes[f"{r.task}/{r.context}"]
        if r.method in ("snapkv", "snapkv@prompt"):  # chunk by chunk, or once after the prompt
            assert 0 < r.kv_bytes <= 0.5 * full
        if r.method in ("kivi4", "hf-quanto4"):
            assert r.kv_bytes < full  # packed, not floats
        if r.method == "full":
            assert r.kv_ratio == 1.0
        if r.method == "kivi4":
            # the ratio is what KIVI-4's format holds: every full block at its bits per element, at
            # most the last partial block of each layer in float32 (32 bits)
            low = block_bits(KIVI(4), llama.spec.num_kv_heads, CONFIG.block_size, llama.spec.head_dim) / 32
            residual = CONFIG.block_size / r.prompt_tokens
            assert low * (1 - residual) <= r.kv_ratio <= low + residual
    text = [r for r in result.records if r.task == "realtext"]
    assert {r.method for r in text} == set(CONFIG.methods)
    assert all(r.ppl is not None and r.kl is not None and r.kl >= -1e-6 for r in text)
    by_method = {r.method: r for r in text}  # the full row is the KL reference itself
    # transformers' DynamicCache, teacher-forced token by token, is the full cache: same bytes, no KL
    assert by_method["hf"].kl == pytest.approx(0.0, abs=1e-5)
    assert by_method["hf"].prompt_tokens == by_method["full"].prompt_tokens
    block = CONFIG.block_size * llama.spec.kv_bytes_per_token  # kvmem holds whole blocks
    assert 0 <= by_method["full"].kv_bytes - by_method["hf"].kv_bytes < block
    assert by_method["hf-quanto4"].kl > 1e-6  # 4-bit keys and values change the distribution


def test_full_cache_through_kvmem_answers_as_transformers_generate(result: BenchResult) -> None:
    def answers(method: str) -> list[tuple[str, int, str, float | None]]:
        return [
            (r.task, r.question, r.output, r.score)
            for r in result.records
            if r.method == method and r.task != "realtext"
        ]

    assert answers("full") and answers("full") == answers("hf")
    hf_logprobs = [r.gold_logprob for r in result.records if r.method == "hf" and r.task != "realtext"]
    full_logprobs = [r.gold_logprob for r in result.records if r.method == "full" and r.task != "realtext"]
    assert hf_logprobs == pytest.approx(full_logprobs, abs=1e-4)


def test_multirequest_reuses_the_shared_context(llama: LoadedModel) -> None:
    config = CONFIG.replace(methods=("full", "kivi4", "snapkv"), tasks=("vartrack",), mode="multirequest",
                            length=500, speed_lengths=(64,))  # fmt: skip
    records = run_bench(config, model=llama, progress=False).records
    for method in ("full", "kivi4"):
        rows = [r for r in records if r.method == method]
        assert len(rows) > 1 and rows[0].tokens_reused == 0  # the first request computes the context
        for r in rows[1:]:  # the others adopt its whole blocks
            assert r.tokens_reused % config.block_size == 0 and r.tokens_reused > r.prompt_tokens / 2
    assert all(r.tokens_reused == 0 for r in records if r.method == "snapkv")  # eviction: no sharing
    single = run_bench(config.replace(mode="single"), model=llama, progress=False).records
    outputs = [r.output for r in single if r.method == "full"]
    assert outputs == [r.output for r in records if r.method == "full"]  # reuse changes no answer


def test_replot_redraws_a_results_folder_from_its_json(result: BenchResult, tmp_path: Path) -> None:
    from kvmem.cli import main

    write(result, tmp_path)
    table = (tmp_path / RESULTS_MD).read_text()
    (tmp_path / RESULTS_MD).unlink()
    (tmp_path / ACCURACY_PNG).unlink()
    assert main(["bench", "--replot", str(tmp_path)]) == 0
    assert (tmp_path / RESULTS_MD).read_text() == table and (tmp_path / ACCURACY_PNG).stat().st_size > 0
    assert main(["bench", "--replot", str(tmp_path / "nothing")]) == 2


def test_frontier_keeps_only_points_nothing_beats_with_as_few_bits() -> None:
    points = [(4.0, 0.9), (3.2, 0.5), (6.0, 1.0), (3.2, 0.7), (5.0, 0.8), (2.0, 0.1), (8.0, 1.0)]
    assert frontier(points, higher_is_better=True) == [(2.0, 0.1), (3.2, 0.7), (4.0, 0.9), (6.0, 1.0)]
    kl = [(4.0, 0.03), (3.2, 0.06), (6.0, 0.01), (5.0, 0.05), (2.5, 0.2)]
    assert frontier(kl, higher_is_better=False) == [(2.5, 0.2), (3.2, 0.06), (4.0, 0.03), (6.0, 0.01)]
    assert frontier([], higher_is_better=True) == []
