"""Offloaded retrieval: Quest's bound, the right block fetched, the budget held, files cleaned up."""

from pathlib import Path

import pytest
import torch

from kvmem.compress.budget import KVBudget
from kvmem.compress.offload import quest_bounds
from kvmem.compress.registry import UnknownPolicyError, make_policy
from kvmem.engine.llm import LLM
from kvmem.engine.result import GenerationResult
from kvmem.engine.sampling import SamplingParams
from kvmem.engine.sequence import Sequence
from kvmem.errors import InvalidBudgetError, KVBudgetError, SessionMismatchError
from kvmem.kv.pool import KVPool, PoolConfig
from kvmem.model.layers import LayerParams, OffloadLayer
from kvmem.model.loader import LoadedModel
from kvmem.tiers.offload import OffloadStore


def test_quest_bound_is_an_upper_bound_and_tight_for_one_token() -> None:
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(7, 2, 5, 8, generator=g)  # [N blocks, H, tokens, D]
    query = torch.randn(4, 3, 8, generator=g)  # [Hq = 2 groups of 2, q, D]
    summaries = torch.stack([keys.amin(dim=2), keys.amax(dim=2)], dim=1)  # [N, 2, H, D]
    bounds = quest_bounds(query, summaries)
    qg = query.reshape(2, 6, 8)  # per KV head, its query heads' queries
    true_max = torch.einsum("hgd,nhtd->nhgt", qg, keys).amax(dim=(1, 2, 3))
    assert torch.all(bounds >= true_max - 1e-5)
    one = keys[:, :, :1]  # a block of one token: min == max, the bound is the logit itself
    exact = quest_bounds(query, torch.stack([one[:, :, 0], one[:, :, 0]], dim=1))
    assert torch.allclose(exact, torch.einsum("hgd,nhd->nhg", qg, one[:, :, 0]).amax(dim=(1, 2)), atol=1e-5)


def decode_within(llm: LLM, seq: Sequence, budget: int, steps: int) -> torch.Tensor:
    """Prefill ``seq`` and decode ``steps`` greedy tokens, the pool within ``budget`` and its
    books exact at every step; the last logits."""
    seq.reserve(steps)
    logits = seq.prefill(512)
    for _ in range(steps):
        assert llm.pool.bytes_used <= budget
        assert seq.cache.nbytes == llm.pool.bytes_used == llm.pool.physical_nbytes()
        llm.pool.check_integrity()
        for layer in seq.cache.kv_layers:
            layer.check()
        logits = seq.step(int(logits.argmax()))
    return logits


def test_the_block_a_query_points_at_is_fetched(tmp_path: Path) -> None:
    pool = KVPool(PoolConfig(None, 4))
    params = LayerParams(pool, 2, 8, torch.float32)
    layer = OffloadLayer(params, store=OffloadStore(tmp_path), sinks=1, recent=1)
    layer.room = 3 * layer.block_bytes + 8 * layer.summary_bytes  # 2 resident, 8 summaries, 1 fetch
    g = torch.Generator().manual_seed(1)
    needle = torch.zeros(8)
    needle[3] = 1.0
    for b in range(10):  # ten 4-token blocks, appended and offloaded one forward at a time
        keys = 0.1 * torch.randn(1, 2, 4, 8, generator=g)
        if b == 6:
            keys[..., 3] += 5.0  # block 6's keys point where the query will
        layer.update(keys, torch.full((1, 2, 4, 8), float(b)))
        layer.after_forward()
    assert layer.num_offloaded == 10 - 1 - 1  # all but the sink and the recent block
    fetched = layer.retrieve(needle.expand(1, 2, 1, 8).contiguous())
    assert fetched is not None
    assert fetched[0].shape == (1, 2, 4, 8)  # room for exactly one fetched block
    assert torch.all(fetched[1] == 6.0)  # block 6's values, read back from disk
    assert layer.reads == 1
    layer.check()
    assert layer.nbytes == pool.bytes_used == pool.physical_nbytes()


def test_ample_budget_reproduces_uncompressed_output(tiny: LoadedModel) -> None:
    ids = list(range(3, 150))
    expected = LLM(tiny, block_size=4).generate(ids, max_new_tokens=30).token_ids
    llm = LLM(tiny, block_size=4, kv_budget="1MiB", policy="offload")
    seq = llm.new_sequence()
    seq.token_ids = list(ids)
    result = next(e for e in llm.run(seq, 30, SamplingParams(), ()) if isinstance(e, GenerationResult))
    tokens = result.token_ids
    offloaded = [layer.num_offloaded for layer in seq.cache.kv_layers if isinstance(layer, OffloadLayer)]
    assert offloaded and min(offloaded) > 20  # really on disk, every block fetched back
    assert tokens == expected
    seq.release()


def test_byte_budget_holds_at_every_step_and_files_go_with_the_sequence(tiny: LoadedModel) -> None:
    budget = 64 * 1024  # a full cache of these 347 tokens is several times more
    llm = LLM(tiny, block_size=4, kv_budget=budget, policy="offload")
    seq = llm.new_sequence()
    seq.token_ids = list(range(3, 150))
    logits = decode_within(llm, seq, budget, 200)
    layers = [layer for layer in seq.cache.kv_layers if isinstance(layer, OffloadLayer)]
    assert all(layer.num_offloaded > 60 and layer.reads > 0 for layer in layers)
    assert seq.cache.nbytes < seq.num_cached * tiny.spec.kv_bytes_per_token / 2
    store = seq.cache.store
    assert store is not None and any(store.folder.rglob("*.kvblock"))
    fork = seq.fork()  # shares the offloaded files
    seq.release()
    assert store.folder.exists()
    fork.step(int(logits.argmax()))
    fork.release()
    assert not store.folder.exists() and llm.pool.bytes_used == 0


def test_a_budget_too_small_for_the_summaries_is_refused_up_front(llama: LoadedModel) -> None:
    llm = LLM(llama, block_size=4, kv_budget=24 * 1024, policy="offload")
    with pytest.raises(KVBudgetError, match="offloading"):
        llm.generate(list(range(3, 200)), max_new_tokens=40)
    assert llm.pool.bytes_used == 0
    assert llm.generate(list(range(3, 40)), max_new_tokens=8).stats.new_tokens == 8  # a short one fits


def test_a_refused_floor_says_what_helps(llama: LoadedModel) -> None:
    """The floor is whole blocks a layer, whatever the prompt: the refusal advises what shrinks
    blocks, not a shorter prompt or fewer new tokens (it did; neither helped)."""
    budget, prompt = 24 * 1024, list(range(3, 40))
    for ids, new in ((prompt, 4), (prompt[:10], 1)):  # a shorter prompt, fewer new tokens: refused still
        with pytest.raises(KVBudgetError, match="offloading") as refused:
            LLM(llama, block_size=8, kv_budget=budget, policy="offload").generate(ids, max_new_tokens=new)
        message = str(refused.value)
        assert "--max-new-tokens" not in message and "shorten the prompt" not in message
        assert "--block-size" in message and "block format" in message and "--kv-budget" in message
    smaller = LLM(llama, block_size=4, kv_budget=budget, policy="offload")
    assert smaller.generate(prompt, max_new_tokens=4).stats.kv_bytes <= budget
    packed = LLM(llama, block_size=8, kv_budget=budget, policy="offload+rotk4v2+res8")
    assert packed.generate(prompt, max_new_tokens=4).stats.kv_bytes <= budget


def test_offload_combines_with_a_block_format_only_and_needs_a_byte_budget() -> None:
    for spec in ("offload+snapkv", "offload+mixed", "offload+h2o+kivi4"):
        with pytest.raises(UnknownPolicyError, match="block formats only"):
            make_policy(spec, KVBudget.parse("1MiB"))
    for spec in ("offload+kivi4+rot3", "offload+kivi4+res8+res4", "offload+offload"):
        with pytest.raises(UnknownPolicyError, match="at most one"):
            make_policy(spec, KVBudget.parse("1MiB"))
    with pytest.raises(UnknownPolicyError, match="add one"):
        make_policy("offload+res8", KVBudget.parse("1MiB"))
    with pytest.raises(InvalidBudgetError, match="bytes"):
        make_policy("offload", KVBudget.parse("25%"))
    assert make_policy("offload", KVBudget.parse("1MiB")).name == "offload"
    policy = make_policy("offload+rotk4v2+res8", KVBudget.parse("1MiB"))
    assert policy.name == "rotk4v2+res8+offload"
    assert make_policy(policy.name, KVBudget.parse("1MiB")) == policy
    policy = make_policy("offload+rotk4v2+sliding-rot2+res6", KVBudget.parse("1MiB"))
    assert policy.sliding is not None and policy.sliding.name == "rot2"
    assert make_policy(policy.name, KVBudget.parse("1MiB")) == policy


@pytest.mark.parametrize("policy", ["offload+kivi4", "offload+rotk4v2+res8"])
def test_packed_blocks_are_offloaded_and_fetched_as_their_bytes(llama: LoadedModel, policy: str) -> None:
    # below what plain offload needs for its resident blocks at this length (44 KiB)
    budget = 32 * 1024
    plain = LLM(llama, block_size=8, kv_budget=budget, policy="offload")
    with pytest.raises(KVBudgetError, match="offloading"):
        plain.generate(list(range(3, 200)), max_new_tokens=40)
    llm = LLM(llama, block_size=8, kv_budget=budget, policy=policy)
    seq = llm.new_sequence()
    seq.token_ids = list(range(3, 200))
    decode_within(llm, seq, budget, 40)
    layers = [layer for layer in seq.cache.kv_layers if isinstance(layer, OffloadLayer)]
    assert layers and all(layer.num_offloaded > 20 and layer.reads > 0 for layer in layers)
    for layer in layers:
        layer.check()
        # every block RAM holds is bytes: packed full blocks (resident and fetched), and with res8
        # the block being filled too
        kinds = {kind for _, kind in layer.blocks.blocks()}
        assert kinds == ({"q", "r"} if "res8" in policy else {"q", "f"})
        assert all(llm.pool.tensor(b).dtype == torch.uint8 for b in layer._fetched.values())
    store = seq.cache.store
    assert store is not None
    stored = store.get(layers[0]._files[0])
    assert stored is not None and stored["block"].dtype == torch.uint8  # on disk as its bytes
    seq.release()
    assert llm.pool.bytes_used == 0


def test_an_offloading_chat_cannot_be_saved_yet(llama: LoadedModel, tmp_path: Path) -> None:
    llm = LLM(llama, block_size=4, kv_budget="1MiB", policy="offload")
    with llm.chat() as session:
        session.send("hello there", max_new_tokens=4)
        with pytest.raises(SessionMismatchError, match="offload"):
            session.save(tmp_path / "s.kvsession")
    assert not (tmp_path / "s.kvsession").exists()


def test_what_other_sequences_hold_is_left_to_them(llama: LoadedModel) -> None:
    budget = 64 * 1024
    llm = LLM(llama, block_size=4, kv_budget=budget, policy="offload")
    first = llm.new_sequence()
    first.token_ids = list(range(3, 150))
    first.reserve(0)
    first.prefill(512)
    held = llm.pool.bytes_used
    # its share (the whole budget) cannot be set aside: refused before computing anything
    with pytest.raises(KVBudgetError, match="held outside the engine"):
        llm.generate(list(range(3, 150)), max_new_tokens=4)
    assert llm.pool.bytes_used == held
    first.release()
    assert llm.generate(list(range(3, 150)), max_new_tokens=4).stats.new_tokens == 4


def test_a_forward_the_room_cannot_serve_is_refused_within_the_budget(gemma: LoadedModel) -> None:
    # the sliding layers' fixed share takes nearly all of this budget: no room to offload into
    budget = 20 * 1024
    llm = LLM(gemma, block_size=4, kv_budget=budget, policy="offload")
    with pytest.raises(KVBudgetError, match="offloading"):  # through generate: refused up front
        llm.generate(list(range(3, 150)), max_new_tokens=4)
    assert llm.pool.bytes_used == 0
    seq = llm.new_sequence()
    seq.token_ids = list(range(3, 150))
    with pytest.raises(KVBudgetError, match="offload: layer"):
        seq.prefill(512)  # straight to the forward, without reserve: the policy refuses, no overrun
    assert llm.pool.bytes_used <= budget
    seq.release()
    assert llm.pool.bytes_used == 0


def test_sliding_layers_at_a_format_of_their_own_leave_offload_more_room(gemma: LoadedModel) -> None:
    """Gemma's sliding layers are a fixed cost beside the offloading ones: at a lower format of
    their own they leave room for a budget that the policy's format everywhere cannot serve."""
    budget = 20 * 1024
    with pytest.raises(KVBudgetError, match="offload"):
        LLM(gemma, block_size=8, kv_budget=budget, policy="offload+kivi4").generate(
            list(range(3, 200)), max_new_tokens=20
        )
    llm = LLM(gemma, block_size=8, kv_budget=budget, policy="offload+kivi4+sliding-kivi2")
    seq = llm.new_sequence()
    seq.token_ids = list(range(3, 200))
    decode_within(llm, seq, budget, 20)
    formats = {(layer.kind, layer.parts()[""].fmt.name) for layer in seq.cache.kv_layers}  # type: ignore[union-attr]
    assert formats == {("offload", "kivi4"), ("sliding", "kivi2")}
    assert any(layer.num_offloaded > 0 for layer in seq.cache.kv_layers if isinstance(layer, OffloadLayer))
    seq.release()
