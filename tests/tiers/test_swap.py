"""Swap: a preempted sequence's state goes to a file and comes back bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvmem.engine.config import EngineConfig
from kvmem.engine.engine import Engine
from kvmem.engine.llm import LLM
from kvmem.engine.sequence import Sequence
from kvmem.errors import CorruptCacheError
from kvmem.model.loader import LoadedModel
from kvmem.tiers.swap import SwapSpace


def blocks_of(seq: Sequence) -> list[torch.Tensor]:
    parts = [part for layer in seq.cache.kv_layers for part in layer.parts().values()]
    return [tensor.clone() for part in parts for tensor, _ in part.blocks()]


@pytest.mark.parametrize(
    ("policy", "budget"),
    [
        (None, None),
        ("kivi4", None),
        ("kivi4+res8", None),
        ("h2o", "24tok"),
        ("snapkv+adakv", "24tok"),
        ("h2o+mixed", "24tok"),
    ],
)
def test_swap_out_and_in_restores_every_block_and_the_scorer_state(
    tiny: LoadedModel, tmp_path: Path, policy: str | None, budget: str | None
) -> None:
    llm = LLM(tiny, block_size=4, policy=policy, kv_budget=budget)
    seq = llm.new_sequence()
    seq.token_ids = list(range(3, 90))
    logits = seq.prefill(16)
    before = blocks_of(seq)
    held = seq.cache.nbytes
    attention = [layer.attention for layer in seq.cache.kv_layers]
    swap = SwapSpace(tmp_path)
    handle = swap.swap_out(seq.cache)
    assert seq.cache.nbytes == 0 and llm.pool.bytes_used == 0 and handle.nbytes == held
    swap.swap_in(handle, seq.cache)
    assert not handle.path.exists()
    after = blocks_of(seq)
    assert len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))
    for old, layer in zip(attention, seq.cache.kv_layers):
        assert (old is None) == (layer.attention is None)
        assert old is None or torch.equal(old, layer.attention)
    seq.cache.check()
    llm.pool.check_integrity()
    # it goes on as if it had never stopped
    token = int(logits.argmax())
    fork = seq.fork()
    assert torch.equal(seq.step(token), fork.step(token))
    seq.release()
    fork.release()
    swap.close()
    assert not any(tmp_path.iterdir())


def test_a_damaged_swap_file_is_a_typed_error(llama: LoadedModel, tmp_path: Path) -> None:
    llm = LLM(llama, block_size=4)
    seq = llm.new_sequence()
    seq.token_ids = list(range(3, 40))
    seq.prefill(16)
    swap = SwapSpace(tmp_path)
    handle = swap.swap_out(seq.cache)
    handle.path.write_bytes(b"not a swap file")
    with pytest.raises(CorruptCacheError):
        swap.swap_in(handle, seq.cache)
    assert llm.pool.bytes_used == 0


def test_a_request_whose_swap_file_is_lost_is_recomputed(llama: LoadedModel) -> None:
    prompts = [list(range(3 + i, 60 + i)) for i in range(6)]
    probe = LLM(llama, block_size=4)
    budget = 2 * probe.new_sequence().cache.bytes_to_grow(60 + 40)
    engine = Engine(llama, EngineConfig(model="tiny", kv_budget=budget, block_size=4, reserve_new_tokens=0))
    ids = [engine.add_request(p, max_new_tokens=40) for p in prompts]
    done = {}
    for _ in range(2000):
        if not engine.has_unfinished:
            break
        for request in engine.scheduler.swapped:  # every swap file goes missing
            assert request.swap is not None
            request.swap.path.unlink(missing_ok=True)
        for output in engine.step():
            assert output.error is None
            if output.finished:
                done[output.request_id] = output
        assert engine.pool.bytes_used <= budget
    stats = engine.scheduler.stats
    assert set(done) == set(ids) and stats.swapped_out > 0 and stats.recomputed == stats.swapped_out
    assert all(len(done[i].result.token_ids) == 40 for i in ids)  # type: ignore[union-attr]
    assert engine.pool.bytes_used == 0
