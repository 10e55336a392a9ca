"""Prefix sharing through ``LLM``: reused blocks give the same tokens, are held once, are evicted LRU."""

from pathlib import Path

import pytest

from kvmem.engine.llm import LLM
from kvmem.errors import KVBudgetError
from kvmem.model.loader import LoadedModel
from kvmem.prefix.cache import PrefixSharingError

DOC = "The harbor town kept its lamps lit through the long winter nights, and the ferry ran at six. "
QUESTIONS = ["When did the ferry run?", "What stayed lit?", "Which season was it?"]


def _ids(llm: LLM, text: str) -> list[int]:
    return llm.encode(text)


@pytest.mark.parametrize("policy", [None, "kivi4"])
def test_reused_prefix_gives_the_tokens_of_a_fresh_computation(tiny: LoadedModel, policy: str | None) -> None:
    shared = LLM(tiny, block_size=4, prefill_chunk=4, policy=policy, prefix_cache=True)
    fresh = LLM(tiny, block_size=4, prefill_chunk=4, policy=policy)
    doc_tokens = len(_ids(shared, DOC))
    for i, question in enumerate(QUESTIONS):
        prompt = DOC + question
        result = shared.generate(prompt, max_new_tokens=12)
        assert result.token_ids == fresh.generate(prompt, max_new_tokens=12).token_ids
        expected_reuse = 0 if i == 0 else (doc_tokens // 4) * 4  # whole blocks of the document
        assert result.stats.tokens_reused == expected_reuse
        assert result.stats.tokens_prefilled == result.stats.prompt_tokens - expected_reuse
        shared.pool.check_integrity()
        assert shared.prefix is not None
        shared.prefix.check_integrity()


def test_same_prompt_twice_computes_only_the_last_block(tiny: LoadedModel) -> None:
    llm = LLM(tiny, block_size=4, prefill_chunk=4, prefix_cache=True)
    first = llm.generate(DOC, max_new_tokens=8)
    again = llm.generate(DOC, max_new_tokens=8)
    assert again.token_ids == first.token_ids
    n = first.stats.prompt_tokens
    assert again.stats.tokens_reused == ((n - 1) // 4) * 4  # the last token is always computed
    assert 1 <= again.stats.tokens_prefilled <= 4


def test_two_live_sequences_hold_a_shared_prefix_once(llama: LoadedModel) -> None:
    llm = LLM(llama, block_size=4, prefill_chunk=4, prefix_cache=True)
    first = llm.new_sequence()
    first.token_ids = _ids(llm, DOC + QUESTIONS[0])
    first.prefill(512)
    alone = llm.pool.bytes_used
    second = llm.new_sequence()
    second.token_ids = _ids(llm, DOC + QUESTIONS[1])
    reused = second.reuse_prefix()
    assert reused == (len(_ids(llm, DOC)) // 4) * 4
    second.prefill(512)
    shared_blocks = [layer.table.block_ids[: reused // 4] for layer in second.cache.kv_layers]
    for layer, ids in zip(first.cache.kv_layers, shared_blocks):
        assert layer.table.block_ids[: len(ids)] == ids  # the very same pool blocks
    # held once: the pool grew only by the second sequence's own blocks
    own = sum(len(layer.table.block_ids) - reused // 4 for layer in second.cache.kv_layers)
    assert llm.pool.bytes_used == alone + own * second.cache.kv_layers[0].stream().block_bytes
    assert llm.pool.bytes_used == llm.pool.physical_nbytes()
    assert all(llm.pool.manager.ref_count(b) == 3 for ids in shared_blocks for b in ids)  # index + 2
    llm.pool.check_integrity()
    first.release()
    second.release()
    assert all(llm.pool.manager.ref_count(b) == 1 for ids in shared_blocks for b in ids)  # index only
    assert llm.prefix is not None
    llm.prefix.clear()
    assert llm.pool.bytes_used == 0 and llm.pool.num_blocks == 0
    llm.pool.check_integrity()


def test_cached_blocks_give_way_lru_under_the_budget(llama: LoadedModel) -> None:
    budget = 48_000  # 46 blocks of 1 KiB (a layer's 4 tokens); the longest request needs 44
    llm = LLM(llama, kv_budget=budget, block_size=4, prefill_chunk=4, prefix_cache=True)
    prompts = ["ABCDEF"[i] + " asks: " + DOC[: 40 + 7 * i] for i in range(6)]  # no block in common
    for prompt in prompts:  # every prompt alone fits; all of them cached do not
        result = llm.generate(prompt, max_new_tokens=6)
        assert llm.pool.bytes_used <= budget
        llm.pool.check_integrity()
    assert result.stats.tokens_reused == 0
    again = llm.generate(prompts[-1], max_new_tokens=6)  # the most recent is still cached
    assert again.stats.tokens_reused > 0 and again.token_ids == result.token_ids
    first = llm.generate(prompts[0], max_new_tokens=6)  # the oldest was evicted
    assert first.stats.tokens_reused == 0


def test_a_salt_keeps_tenants_apart(llama: LoadedModel) -> None:
    llm = LLM(llama, block_size=4, prefill_chunk=4, prefix_cache=True)
    llm.generate(DOC, max_new_tokens=4, cache_salt="tenant-a")
    assert llm.generate(DOC, max_new_tokens=4, cache_salt="tenant-b").stats.tokens_reused == 0
    assert llm.generate(DOC, max_new_tokens=4).stats.tokens_reused == 0  # no salt is its own tenant
    assert llm.generate(DOC, max_new_tokens=4, cache_salt="tenant-a").stats.tokens_reused > 0


def test_sliding_layers_rebuild_their_window_from_cached_blocks(gemma: LoadedModel) -> None:
    # window 8 over 4-token blocks: a sliding layer's old blocks are freed, the index keeps them
    llm = LLM(gemma, block_size=4, prefill_chunk=4, prefix_cache=True)
    fresh = LLM(gemma, block_size=4, prefill_chunk=4)
    llm.generate(DOC + QUESTIONS[0], max_new_tokens=10)
    result = llm.generate(DOC + QUESTIONS[1], max_new_tokens=10)
    assert result.stats.tokens_reused > 0
    assert result.token_ids == fresh.generate(DOC + QUESTIONS[1], max_new_tokens=10).token_ids


def test_chat_turns_share_a_system_prompt(llama: LoadedModel) -> None:
    llm = LLM(llama, block_size=4, prefill_chunk=4, prefix_cache=True)
    system = "You answer questions about the harbor town. " + DOC
    with llm.chat(system) as one:
        one.send(QUESTIONS[0], max_new_tokens=6)
    with llm.chat(system) as two:
        result = two.send(QUESTIONS[1], max_new_tokens=6)
    assert result.stats.tokens_reused >= 4 * (len(_ids(llm, system)) // 4) - 4
    fresh = LLM(llama, block_size=4, prefill_chunk=4).chat(system)
    assert fresh.send(QUESTIONS[1], max_new_tokens=6).token_ids == result.token_ids


def test_a_refused_request_releases_what_it_adopted(llama: LoadedModel) -> None:
    llm = LLM(llama, kv_budget=60_000, block_size=4, prefill_chunk=4, prefix_cache=True)
    llm.generate(DOC, max_new_tokens=4)
    cached = llm.pool.bytes_used
    refs = {b: llm.pool.manager.ref_count(b) for b in llm.pool.manager.live_ids()}
    with pytest.raises(KVBudgetError):
        llm.generate(DOC + "x" * 100, max_new_tokens=4)  # would reuse DOC's blocks, then not fit
    llm.pool.check_integrity()
    assert llm.pool.bytes_used == cached  # nothing left behind by the refused request
    assert {b: llm.pool.manager.ref_count(b) for b in llm.pool.manager.live_ids()} == refs


def test_eviction_policies_do_not_share_prefixes(llama: LoadedModel) -> None:
    with pytest.raises(PrefixSharingError, match="quantizer alone"):
        LLM(llama, kv_budget="25%", policy="snapkv", prefix_cache=True)


def test_sliding_layers_old_blocks_give_way_so_a_tight_budget_holds(gemma: LoadedModel) -> None:
    ids = list(range(3, 203))
    plain = LLM(gemma, block_size=4, prefill_chunk=4)
    seq = plain.new_sequence()
    seq.token_ids = list(ids)
    seq.prefill(512)
    budget = plain.pool.bytes_used + 8 * 1024  # what the sequence itself needs, and a little
    seq.release()
    llm = LLM(gemma, block_size=4, prefill_chunk=4, kv_budget=budget, prefix_cache=True)
    seq = llm.new_sequence()
    seq.token_ids = list(ids)
    seq.reserve(0)
    seq.prefill(512)  # the index keeps sliding blocks out of the window only while there is room
    assert llm.pool.bytes_used <= budget
    llm.pool.check_integrity()
    seq.release()


def test_a_chain_is_cut_from_its_end(llama: LoadedModel) -> None:
    llm = LLM(llama, block_size=4, prefill_chunk=4, prefix_cache=True)
    first = llm.generate(DOC, max_new_tokens=2)
    assert llm.prefix is not None
    one_entry = 2 * llm.new_sequence().cache.kv_layers[0].stream().block_bytes
    assert llm.prefix.reclaim(one_entry) == one_entry
    again = llm.generate(DOC, max_new_tokens=2)  # all but the last cached block still reused
    assert again.stats.tokens_reused == (first.stats.prompt_tokens - 1) // 4 * 4 - 4


def test_a_resumed_session_keeps_its_tenant_salt(llama: LoadedModel, tmp_path: Path) -> None:
    llm = LLM(llama, block_size=4, prefill_chunk=4, prefix_cache=True)
    path = tmp_path / "a.kvsession"
    with llm.chat(DOC, cache_salt="tenant-a") as session:
        session.send(QUESTIONS[0], max_new_tokens=4)
        session.save(path)
        tokens = list(session.sequence.token_ids)
    assert llm.prefix is not None
    llm.prefix.clear()
    resumed = llm.load_chat(path)
    assert resumed.cache_salt == "tenant-a"
    resumed.send(QUESTIONS[1], max_new_tokens=4)
    resumed.close()
    assert llm.generate(tokens[:-1], max_new_tokens=2).stats.tokens_reused == 0  # another tenant


def test_offloading_does_not_share_prefixes(llama: LoadedModel) -> None:
    with pytest.raises(PrefixSharingError):
        LLM(llama, kv_budget="1MiB", policy="offload", prefix_cache=True)


def test_an_allocation_that_cannot_fit_keeps_the_cache(llama: LoadedModel) -> None:
    llm = LLM(llama, kv_budget=60_000, block_size=4, prefill_chunk=4, prefix_cache=True)
    llm.generate(DOC, max_new_tokens=2)
    assert llm.prefix is not None
    entries, free = len(llm.prefix.index), llm.pool.bytes_free
    assert free is not None
    with pytest.raises(KVBudgetError):
        llm.pool.allocate_raw(free + llm.prefix.reclaimable() + 1, llm.pool.tensor(0).device)
    assert len(llm.prefix.index) == entries  # evicting would not have helped: nothing evicted


class ForwardLog:
    """The token ids of every model forward (one entry per prefill chunk or decode step)."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.calls: list[tuple[int, ...]] = []
        embed = loaded.model.get_input_embeddings()
        self.handle = embed.register_forward_pre_hook(
            lambda _m, args: self.calls.append(tuple(args[0][0].tolist()))
        )

    def take(self) -> list[tuple[int, ...]]:
        calls, self.calls = self.calls, []
        return calls


@pytest.mark.parametrize("exact", [True, False])
def test_reuse_ends_where_a_cold_run_began_a_prefill_chunk(llama: LoadedModel, exact: bool) -> None:
    """With ``exact_reuse`` (the default) a reused prefix is a multiple of ``prefill_chunk``, so
    a warm run's forwards are the cold run's last forwards, token for token and shape for shape:
    whatever the CPU's kernels round, they round the same (bfloat16 tokens drifted without it).
    Without it every whole block is reused and the rest runs in a chunk of another shape."""
    llm = LLM(llama, block_size=4, prefill_chunk=16, prefix_cache=True, exact_reuse=exact)
    prompt = list(range(3, 93))  # 90 tokens: cold chunks of 16, 16, 16, 16, 16, 10
    log = ForwardLog(llama)
    try:
        cold = llm.generate(prompt, max_new_tokens=6)
        cold_calls = log.take()
        warm = llm.generate(prompt, max_new_tokens=6)
        warm_calls = log.take()
    finally:
        log.handle.remove()
    assert [len(c) for c in cold_calls[:6]] == [16, 16, 16, 16, 16, 10]
    assert warm.token_ids == cold.token_ids
    if exact:
        assert warm.stats.tokens_reused == 80  # 5 whole chunks; 88 would be whole blocks
        assert warm_calls == cold_calls[-len(warm_calls) :]
    else:
        assert warm.stats.tokens_reused == 88
        assert warm_calls[0] == tuple(prompt[88:]) and warm_calls[0] not in cold_calls


def test_a_prompt_shorter_than_one_chunk_reuses_nothing_by_default(llama: LoadedModel) -> None:
    llm = LLM(llama, block_size=4, prefill_chunk=64, prefix_cache=True)
    llm.generate(list(range(3, 50)), max_new_tokens=2)
    assert llm.generate(list(range(3, 50)), max_new_tokens=2).stats.tokens_reused == 0
    assert llm.generate(list(range(3, 80)), max_new_tokens=2).stats.tokens_reused == 0  # 44 cached, < 64


def test_reusable_prefixes_are_checked_at_the_stride_they_are_cut_to() -> None:
    """A sliding layer's window moves back with the cut: the blocks it needs there must be held.
    Blocks 16-22 of the sliding layer fell out of its window before it was published (None): 31
    entries are complete, but cut to a stride of 8 the window would need them; 16 is the most."""
    from types import SimpleNamespace

    from kvmem.prefix.cache import PrefixCache

    bs, keep = 64, 512
    sliding = [None if 16 <= j <= 22 else j for j in range(31)]
    entries = [SimpleNamespace(blocks=[j, sliding[j]]) for j in range(31)]
    cache = SimpleNamespace(kv_layers=[SimpleNamespace(keep=None), SimpleNamespace(keep=keep)])
    fake = SimpleNamespace(block_size=bs)
    assert PrefixCache._reusable(fake, cache, entries) == 31  # type: ignore[arg-type]
    assert PrefixCache._reusable(fake, cache, entries, step=8) == 16  # type: ignore[arg-type]
