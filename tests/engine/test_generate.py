"""LLM.generate / stream on tiny models: exactness, stops, sampling, budgets, bad input."""

import pytest
import torch

from kvmem.engine.llm import LLM
from kvmem.engine.result import GenerationResult
from kvmem.engine.sampling import SamplingParams
from kvmem.errors import KVBudgetError, PromptTooLongError
from kvmem.model.cache import KVMemCache
from kvmem.model.loader import LoadedModel

PROMPT = "The quick brown fox jumps over the lazy dog. " * 3


def hf_greedy(loaded: LoadedModel, ids: list[int], n: int) -> list[int]:
    out = loaded.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


def test_greedy_matches_transformers_generate(tiny: LoadedModel) -> None:
    llm = LLM(tiny, block_size=4, prefill_chunk=256)
    ids = llm.encode(PROMPT)
    result = llm.generate(ids, max_new_tokens=40)
    assert result.token_ids == hf_greedy(tiny, ids, 40)
    assert result.finish_reason == "length"
    assert result.stats.new_tokens == 40 and result.stats.prompt_tokens == len(ids)
    assert result.stats.tokens_seen == len(ids) + 39
    assert llm.pool.bytes_used == 0
    llm.pool.check_integrity()


def test_stats_report_the_bytes_really_held(tiny: LoadedModel) -> None:
    llm = LLM(tiny, block_size=4)
    sequence = llm.new_sequence()
    sequence.token_ids = llm.encode(PROMPT)
    events = list(llm.run(sequence, 10, SamplingParams(), ()))
    result = events[-1]
    assert isinstance(result, GenerationResult)
    assert result.stats.kv_bytes == sequence.cache.nbytes == llm.pool.physical_nbytes()
    sequence.release()


@pytest.mark.parametrize("words", [1, 3, 20])
def test_a_full_cache_is_at_most_a_full_cache(tiny: LoadedModel, words: int) -> None:
    """The ratio compares whole blocks with whole blocks: a 4-token prompt in 64-token blocks is
    not 16 times a full cache (it was, against a token-exact figure)."""
    llm = LLM(tiny)  # the default 64-token blocks
    stats = llm.generate("hi " * words, max_new_tokens=3).stats
    assert stats.kv_bytes <= stats.kv_bytes_full and stats.kv_ratio <= 1.0
    if not tiny.spec.num_sliding_layers:  # every layer holds every token: exactly a full cache
        assert stats.kv_ratio == 1.0 and stats.kv_tokens == stats.tokens_seen


def layer_tokens(sequence_cache: KVMemCache) -> int:
    """Tokens the layers hold, per layer on average, read from their block lists."""
    layers = sequence_cache.kv_layers
    return round(sum(sum(p.held for p in layer.parts().values()) for layer in layers) / len(layers))


@pytest.mark.parametrize("policy", [None, "streamingllm", "snapkv+mixed"])
def test_kv_tokens_are_the_tokens_held(tiny: LoadedModel, policy: str | None) -> None:
    budget = None if policy is None else "12tok"
    llm = LLM(tiny, block_size=4, policy=policy, kv_budget=budget)
    sequence = llm.new_sequence()
    sequence.token_ids = llm.encode(PROMPT)
    result = list(llm.run(sequence, 10, SamplingParams(), ()))[-1]
    assert isinstance(result, GenerationResult)
    stats = result.stats
    assert stats.tokens_seen == len(sequence.token_ids) - 1  # the last token is not computed yet
    assert stats.kv_tokens == layer_tokens(sequence.cache)
    if policy == "streamingllm" or tiny.spec.num_sliding_layers:  # tokens left the cache, or a window
        assert stats.kv_tokens < stats.tokens_seen
    elif policy is None:
        assert stats.kv_tokens == stats.tokens_seen
    else:  # mixed precision: the demoted tokens are held too, at 2 bits
        layers = sequence.cache.kv_layers
        assert stats.kv_tokens > round(sum(layer.held for layer in layers) / len(layers))
    sequence.release()


def test_stream_pieces_join_to_the_text(llama: LoadedModel) -> None:
    llm = LLM(llama)
    events = list(llm.stream(PROMPT, max_new_tokens=30))
    result = events[-1]
    assert isinstance(result, GenerationResult)
    assert "".join(e for e in events[:-1] if isinstance(e, str)) == result.text
    assert result.text == llama.tokenizer.decode(result.token_ids, skip_special_tokens=True)


def test_stop_string_ends_generation_before_it(llama: LoadedModel) -> None:
    llm = LLM(llama)
    full = llm.generate(PROMPT, max_new_tokens=40).text
    stop = next(ch for ch in full[5:] if ch != "\ufffd")
    result = llm.generate(PROMPT, max_new_tokens=40, stop=[stop])
    assert result.finish_reason == "stop"
    assert result.text == full[: full.find(stop)]
    events = list(llm.stream(PROMPT, max_new_tokens=40, stop=[stop]))
    assert "".join(e for e in events if isinstance(e, str)) == result.text


def test_eos_ends_generation(llama: LoadedModel) -> None:
    llm = LLM(llama)
    first = llm.generate(PROMPT, max_new_tokens=30).token_ids
    eos = first[5]
    llama.model.generation_config.eos_token_id = eos
    try:
        result = llm.generate(PROMPT, max_new_tokens=30)
    finally:
        llama.model.generation_config.eos_token_id = None
    assert result.finish_reason == "eos"
    assert result.token_ids == first[: first.index(eos) + 1]


def test_sampling_is_seeded(llama: LoadedModel) -> None:
    llm = LLM(llama)
    a = llm.generate(PROMPT, max_new_tokens=30, temperature=1.0, seed=1).token_ids
    b = llm.generate(PROMPT, max_new_tokens=30, temperature=1.0, seed=1).token_ids
    c = llm.generate(PROMPT, max_new_tokens=30, temperature=1.0, seed=2).token_ids
    assert a == b
    assert a != c
    greedy = llm.generate(PROMPT, max_new_tokens=30).token_ids
    assert llm.generate(PROMPT, max_new_tokens=30, temperature=0.7, top_k=1, seed=5).token_ids == greedy


def test_budget_too_small_raises_before_computing_and_pool_stays_usable(tiny: LoadedModel) -> None:
    probe = LLM(tiny, block_size=4)
    ids = probe.encode(PROMPT)
    needed = probe.new_sequence().cache.bytes_to_grow(len(ids) + 19)
    llm = LLM(tiny, kv_budget=needed - 1, block_size=4)
    with pytest.raises(KVBudgetError) as err:
        llm.generate(ids, max_new_tokens=20)
    assert err.value.needed == needed and err.value.available == needed - 1
    assert llm.pool.bytes_used == 0
    llm.pool.check_integrity()
    # the same pool still serves a request that fits
    assert llm.generate(ids, max_new_tokens=10).stats.new_tokens == 10
    exact = LLM(tiny, kv_budget=needed, block_size=4)
    result = exact.generate(ids, max_new_tokens=20)
    assert result.stats.kv_bytes <= needed


def test_prompt_longer_than_context(llama: LoadedModel) -> None:
    llm = LLM(llama)
    with pytest.raises(PromptTooLongError, match="256 tokens of context"):
        llm.generate(list(range(10)) * 30, max_new_tokens=5)


def test_generation_stops_at_the_context_limit(llama: LoadedModel) -> None:
    result = LLM(llama).generate(list(range(250)), max_new_tokens=50)
    assert result.stats.new_tokens == 6 and result.finish_reason == "length"


def test_bad_arguments(llama: LoadedModel) -> None:
    llm = LLM(llama)
    with pytest.raises(ValueError):
        llm.generate(PROMPT, max_new_tokens=0)
    with pytest.raises(ValueError):
        llm.generate(PROMPT, temperature=-1)
    with pytest.raises(ValueError):
        llm.generate(PROMPT, top_p=0)


def test_on_prefill_reports_each_chunk_until_the_prompt_is_in(llama: LoadedModel) -> None:
    llm = LLM(llama, block_size=4, prefill_chunk=8)
    calls: list[tuple[int, int]] = []
    prompt = list(range(3, 60))  # 57 tokens: 8 chunks
    events = list(
        llm.stream(prompt, max_new_tokens=5, on_prefill=lambda done, total: calls.append((done, total)))
    )
    assert calls == [(min(8 * i, 57), 57) for i in range(1, 9)]  # then silent while decoding
    assert len(events) > 1
    session = llm.chat()
    turn: list[tuple[int, int]] = []
    session.send("hello", max_new_tokens=4)
    list(session.stream("again, please", 2, lambda done, total: turn.append((done, total))))
    assert turn and turn[-1][0] == turn[-1][1] == turn[0][1]  # the turn's new tokens only
