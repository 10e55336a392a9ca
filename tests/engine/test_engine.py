"""The engine: many requests in one pool — batching, admission that reserves, preemption, abort."""

from __future__ import annotations

import pytest
import torch

from kvmem.engine.config import EngineConfig
from kvmem.engine.engine import Engine
from kvmem.engine.llm import LLM
from kvmem.engine.request import RequestOutput, Status
from kvmem.errors import KVBudgetError
from kvmem.model.loader import LoadedModel

BS = 4


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(12, 60, (n,), generator=g).tolist()
    return [torch.randint(3, 250, (k,), generator=g).tolist() for k in lengths]


def drive(engine: Engine, budget: int | None = None) -> dict[str, RequestOutput]:
    """Step until done, checking the pool after every step; the final output of each request."""
    done: dict[str, RequestOutput] = {}
    for _ in range(10_000):
        if not engine.has_unfinished:
            break
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output
        engine.pool.check_integrity()
        if budget is not None:
            assert engine.pool.bytes_used <= budget
    assert not engine.has_unfinished
    return done


def test_a_list_of_prompts_is_one_batch_with_the_tokens_of_each_alone(tiny: LoadedModel) -> None:
    llm = LLM(tiny, block_size=BS)
    batch = prompts(6)
    alone = [llm.generate(p, max_new_tokens=16).token_ids for p in batch]
    together = llm.generate(batch, max_new_tokens=16)
    assert [r.token_ids for r in together] == alone
    assert llm.engine.scheduler.stats.peak_running == 6  # really run at once
    assert llm.pool.bytes_used == 0


def test_sixteen_requests_in_a_pool_for_four_queue_preempt_and_match_alone(llama: LoadedModel) -> None:
    batch = prompts(16, seed=1)
    reference = LLM(llama, block_size=BS)
    alone = [reference.generate(p, max_new_tokens=24).token_ids for p in batch]
    per_request = max(reference.new_sequence().cache.bytes_to_grow(len(p) + 23) for p in batch)
    budget = 4 * per_request  # about four requests at once
    # reserving 4 new tokens ahead admits more than fit to the end: some must be preempted
    config = EngineConfig(model="tiny", kv_budget=budget, block_size=BS, reserve_new_tokens=4, max_num_seqs=8)
    engine = Engine(llama, config)
    ids = [engine.add_request(p, max_new_tokens=24) for p in batch]
    done = drive(engine, budget)
    assert [done[i].result.token_ids for i in ids] == alone  # type: ignore[union-attr]
    stats = engine.scheduler.stats
    assert stats.queued > 0 and stats.preemptions > 0 and stats.swapped_in == stats.swapped_out > 0
    preempted = [done[i].result.stats.preemptions for i in ids]  # type: ignore[union-attr]
    assert any(preempted)  # those were swapped out and back in, and their tokens still match alone
    assert engine.pool.bytes_used == 0
    engine.close()


def test_full_reservations_never_preempt(llama: LoadedModel) -> None:
    batch = prompts(12, seed=2)
    probe = LLM(llama, block_size=BS)
    alone = [probe.generate(p, max_new_tokens=12).token_ids for p in batch]
    budget = 3 * max(probe.new_sequence().cache.bytes_to_grow(len(p) + 11) for p in batch)
    engine = Engine(llama, EngineConfig(model="tiny", kv_budget=budget, block_size=BS))
    ids = [engine.add_request(p, max_new_tokens=12) for p in batch]
    done = drive(engine, budget)
    assert [done[i].result.token_ids for i in ids] == alone  # type: ignore[union-attr]
    assert engine.scheduler.stats.preemptions == 0 and engine.scheduler.stats.queued > 0


def test_a_request_that_could_never_fit_is_refused_up_front(llama: LoadedModel) -> None:
    engine = Engine(llama, EngineConfig(model="tiny", kv_budget=8 * 1024, block_size=BS))
    with pytest.raises(
        KVBudgetError, match=r"KV budget exceeded: the request \(\d+ tokens: prompt and new\) needs"
    ):
        engine.add_request(list(range(3, 200)), max_new_tokens=8)
    with pytest.raises(
        KVBudgetError, match=r"the request \(12 tokens: prompt and new\), within its own share, needs"
    ):
        engine.add_request(list(range(3, 12)), max_new_tokens=4, kv_budget=1024)
    assert not engine.has_unfinished and engine.pool.bytes_used == 0


@pytest.mark.parametrize("where", ["queued", "prefill", "decode", "swapped"])
def test_abort_at_any_point_returns_every_block(llama: LoadedModel, where: str) -> None:
    batch = prompts(6, seed=3)
    probe = LLM(llama, block_size=BS)
    budget = 2 * max(probe.new_sequence().cache.bytes_to_grow(len(p) + 40) for p in batch)
    config = EngineConfig(
        model="tiny", kv_budget=budget, block_size=BS, prefill_chunk=8, reserve_new_tokens=0
    )
    engine = Engine(llama, config)
    ids = [engine.add_request(p, max_new_tokens=40) for p in batch]
    want = {
        "queued": Status.WAITING,
        "prefill": Status.RUNNING,
        "decode": Status.RUNNING,
        "swapped": Status.SWAPPED,
    }[where]
    victim = None
    for _ in range(500):
        engine.step()
        for request_id in ids:
            request = engine.requests.get(request_id)
            if request is None or request.status is not want:
                continue
            decoding = bool(request.generated)
            if (where == "prefill" and decoding) or (where == "decode" and not decoding):
                continue
            victim = request_id
        if victim is not None:
            break
    assert victim is not None, f"no request was {where}"
    engine.abort(victim)
    rest = drive(engine, budget)
    assert victim not in rest and set(rest) == set(ids) - {victim}
    assert engine.pool.bytes_used == 0 and engine.pool.num_blocks == 0
    assert not any(engine.swap.folder.iterdir())  # no swap file left behind


def test_each_sequence_keeps_within_its_share(llama: LoadedModel) -> None:
    budget = 64 * 1024
    engine = Engine(
        llama, EngineConfig(model="tiny", kv_budget=budget, policy="h2o", block_size=BS, max_num_seqs=2)
    )
    ids = [engine.add_request(list(range(3, 250)), max_new_tokens=40) for _ in range(2)]
    share = budget // 2
    for _ in range(200):
        if not engine.has_unfinished:
            break
        engine.step()
        running = engine.scheduler.running
        assert all(r.seq.cache.nbytes <= share for r in running)
        assert engine.pool.bytes_used <= budget
    assert not engine.has_unfinished and len(ids) == 2
    # a request may bring its own share instead of the equal one
    big = engine.add_request(list(range(3, 250)), max_new_tokens=4, kv_budget=48 * 1024)
    small = engine.add_request(list(range(3, 250)), max_new_tokens=4, kv_budget=16 * 1024)
    peak = {big: 0, small: 0}
    while engine.has_unfinished:
        engine.step()
        for r in engine.scheduler.running:
            peak[r.request_id] = max(peak[r.request_id], r.seq.cache.nbytes)
    assert 16 * 1024 < peak[big] <= 48 * 1024 and peak[small] <= 16 * 1024


def test_each_request_has_its_own_policy_salt_and_sampling(llama: LoadedModel) -> None:
    engine = Engine(llama, EngineConfig(model="tiny", block_size=BS))
    ids = [
        engine.add_request(list(range(3, 40)), max_new_tokens=20, policy="kivi4"),
        engine.add_request(list(range(3, 40)), max_new_tokens=20, policy=None),
        engine.add_request(list(range(3, 40)), max_new_tokens=20, policy="kivi2"),
    ]
    policies = [engine.requests[i].seq.policy for i in ids]
    assert [None if p is None else p.name for p in policies] == ["kivi4", None, "kivi2"]
    done = drive(engine)
    bytes_held = [done[i].result.stats.kv_bytes for i in ids]  # type: ignore[union-attr]
    assert bytes_held[2] < bytes_held[0] < bytes_held[1]
    alone = LLM(llama, block_size=BS, policy="kivi4").generate(list(range(3, 40)), max_new_tokens=20)
    assert done[ids[0]].result.token_ids == alone.token_ids  # type: ignore[union-attr]


def test_the_engine_runs_on_the_model_s_device(llama: LoadedModel) -> None:
    device = torch.device("cpu")  # CI has no GPU; the same code path takes the model's device
    llama.model.to(device)
    engine = Engine(llama, EngineConfig(model="tiny", block_size=BS, policy="snapkv+kivi4"))
    rid = engine.add_request(list(range(3, 90)), max_new_tokens=8, kv_budget=32 * 1024)
    done = drive(engine)
    assert done[rid].result is not None and len(done[rid].result.token_ids) == 8


def test_policy_none_means_the_full_cache_on_an_engine_with_a_policy(llama: LoadedModel) -> None:
    """A request's ``policy=None`` (the server's ``kv_policy: "none"``) runs without compression,
    even where the engine has a policy of its own."""
    engine = Engine(llama, EngineConfig(model="tiny", policy="kivi4", block_size=BS))
    plain = engine.add_request(list(range(3, 40)), max_new_tokens=8, policy=None)
    default = engine.add_request(list(range(3, 40)), max_new_tokens=8)
    assert engine.requests[plain].seq.policy is None
    assert engine.requests[default].seq.policy is engine.policy
    done = drive(engine)
    alone = LLM(llama, block_size=BS).generate(list(range(3, 40)), max_new_tokens=8)
    assert done[plain].result.token_ids == alone.token_ids  # type: ignore[union-attr]
