"""Compress once after the prompt: the prompt runs at full size within a stated peak, then is cut
to the budget with the whole prompt (the question at its end) in view; decoding stays within it."""

from __future__ import annotations

import pytest
import torch

from kvmem.compress.budget import KVBudget
from kvmem.compress.policy import Policy
from kvmem.compress.registry import make_policy
from kvmem.engine.config import EngineConfig
from kvmem.engine.engine import Engine
from kvmem.engine.llm import LLM
from kvmem.engine.sampling import SamplingParams, sample
from kvmem.engine.sequence import Sequence
from kvmem.errors import InvalidBudgetError, KVBudgetError
from kvmem.model.batch import forward
from kvmem.model.loader import LoadedModel

BS = 4
PROMPT = list(range(3, 203))  # 200 tokens


def _bytes(llama: LoadedModel, tokens: int) -> int:
    return tokens * llama.spec.kv_bytes_per_token


def test_the_prompt_runs_whole_then_is_cut_to_the_budget(llama: LoadedModel) -> None:
    budget, peak = _bytes(llama, 48), _bytes(llama, 256)
    llm = LLM(
        llama, block_size=BS, kv_budget=budget, policy="snapkv", compress_after_prompt=peak, prefill_chunk=32
    )
    seq = llm.new_sequence()
    seq.token_ids = list(PROMPT)
    held = []
    while seq.num_pending:  # the prefill's chunks, one by one, as Sequence.prefill runs them
        with torch.inference_mode():
            (logits,) = forward(llm.loaded.model, [seq.begin(seq.chunk_size(32))])
        seq.end()
        held.append(seq.cache.nbytes)
        assert llm.pool.bytes_used <= peak
    # nothing was evicted until the last chunk: the cache grew with the prompt, then was cut
    assert held[:-1] == sorted(held[:-1]) and held[-2] >= _bytes(llama, 160)
    assert held[-1] <= budget
    for layer in seq.cache.kv_layers:
        assert layer.held < len(PROMPT)
    for _ in range(60):  # decoding under the budget, at every step
        logits = seq.step(sample(logits, SamplingParams(), None))
        assert seq.cache.nbytes <= budget and llm.pool.bytes_used <= peak
        llm.pool.check_integrity()
    seq.release()
    assert llm.pool.bytes_used == 0


def test_snapkv_after_the_prompt_keeps_what_the_prompt_s_last_queries_attend_to(llama: LoadedModel) -> None:
    """Compressed once, the layer holds what one SnapKV eviction of the whole, uncompressed prompt
    keeps (same scorer, same observation window: the prompt's last queries); chunk by chunk it
    differs, since early chunks were cut before the end of the prompt was seen."""
    budget, peak = _bytes(llama, 48), _bytes(llama, 256)
    once = LLM(
        llama, block_size=BS, kv_budget=budget, policy="snapkv", compress_after_prompt=peak, prefill_chunk=32
    )
    seq = once.new_sequence()
    seq.token_ids = list(PROMPT)
    seq.prefill(32)
    kept_once = seq.cache.kv_layers[0].past().dense()[0]  # [H, T, D]
    seq.release()

    whole = LLM(llama, block_size=BS, prefill_chunk=32)  # the prompt in full, then one eviction
    policy = Policy(make_policy("snapkv", KVBudget.parse(budget)).parts, KVBudget.parse("100%"))
    ref = Sequence(whole.loaded.model, whole.pool, whole.spec, policy)
    ref.token_ids = list(PROMPT)
    ref.prefill(32)
    layer = ref.cache.kv_layers[0]
    policy.evict(layer, kept_once.shape[1])
    torch.testing.assert_close(layer.past().dense()[0], kept_once, rtol=0, atol=1e-6)
    ref.release()

    chunked = LLM(llama, block_size=BS, kv_budget=budget, policy="snapkv", prefill_chunk=32)
    seq = chunked.new_sequence()
    seq.token_ids = list(PROMPT)
    seq.prefill(32)
    kept_chunked = seq.cache.kv_layers[0].past().dense()[0]
    assert kept_chunked.shape != kept_once.shape or not torch.equal(kept_chunked, kept_once)
    seq.release()


def test_generate_keeps_each_result_within_the_budget_not_the_peak(llama: LoadedModel) -> None:
    """``LLM.generate`` (what the CLI runs) shares the policy's budget, not the pool's larger cap."""
    budget, peak = _bytes(llama, 48), _bytes(llama, 600)
    llm = LLM(llama, block_size=BS, kv_budget=budget, policy="snapkv", compress_after_prompt=peak)
    one = llm.generate(PROMPT, max_new_tokens=6)
    assert 0 < one.stats.kv_bytes <= budget
    both = llm.generate([PROMPT, PROMPT[:150]], max_new_tokens=6)
    assert all(0 < r.stats.kv_bytes <= budget // 2 for r in both)
    assert llm.pool.bytes_used == 0


def test_a_prompt_whose_full_size_exceeds_the_peak_is_refused_up_front(llama: LoadedModel) -> None:
    budget, peak = _bytes(llama, 48), _bytes(llama, 120)
    llm = LLM(llama, block_size=BS, kv_budget=budget, policy="snapkv", compress_after_prompt=peak)
    with pytest.raises(KVBudgetError, match="at full size"):
        llm.generate(PROMPT, max_new_tokens=4)
    assert llm.pool.bytes_used == 0
    assert llm.generate(PROMPT[:100], max_new_tokens=4).token_ids  # a shorter prompt fits the peak


def test_bad_configurations_are_refused(llama: LoadedModel) -> None:
    with pytest.raises(InvalidBudgetError, match="below the KV budget"):
        EngineConfig(model="tiny", kv_budget="64KiB", policy="snapkv", compress_after_prompt="32KiB")
    with pytest.raises(InvalidBudgetError, match="eviction policy"):
        EngineConfig(model="tiny", kv_budget="64KiB", policy="kivi4", compress_after_prompt="1MiB")
    with pytest.raises(InvalidBudgetError, match="eviction policy"):
        EngineConfig(model="tiny", kv_budget="64KiB", compress_after_prompt="1MiB")
    with pytest.raises(InvalidBudgetError):
        EngineConfig(model="tiny", kv_budget="64KiB", policy="snapkv", compress_after_prompt="lots")


def test_many_requests_each_run_whole_then_keep_their_share(llama: LoadedModel) -> None:
    budget, peak = _bytes(llama, 96), _bytes(llama, 600)
    config = EngineConfig(
        model="tiny",
        kv_budget=budget,
        policy="h2o",
        block_size=BS,
        prefill_chunk=32,
        max_num_seqs=2,
        compress_after_prompt=peak,
    )
    engine = Engine(llama, config)
    prompts = [list(range(3 + i, 203 + i)) for i in range(4)]
    ids = [engine.add_request(p, max_new_tokens=30, ignore_eos=True) for p in prompts]
    share = budget // 2
    largest, done = 0, {}
    for _ in range(2_000):
        if not engine.has_unfinished:
            break
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output
        assert engine.pool.bytes_used <= peak
        engine.pool.check_integrity()
        for r in engine.scheduler.running:
            largest = max(largest, r.seq.cache.nbytes)
            if not r.seq.num_pending and r.generated:
                assert r.seq.cache.nbytes <= share  # compressed once its prompt had run
    assert largest > share  # each prompt did run at full size first
    assert sorted(done) == sorted(ids)
    assert all(o.result is not None and len(o.result.token_ids) == 30 for o in done.values())
    assert engine.pool.bytes_used == 0
