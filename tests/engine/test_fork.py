"""A forked sequence is an independent copy: same next tokens, own blocks, no effect on the original."""

import pytest
import torch

from kvmem.engine.llm import LLM
from kvmem.model.loader import LoadedModel


@pytest.mark.parametrize("policy", [None, "h2o+kivi4", "snapkv+adakv", "h2o+mixed"])
def test_fork_continues_exactly_like_the_original(tiny: LoadedModel, policy: str | None) -> None:
    llm = LLM(tiny, block_size=4, kv_budget=None if policy is None else "16KiB", policy=policy)
    seq = llm.new_sequence()
    seq.token_ids = list(range(3, 120))
    logits = seq.prefill(16)
    branch = seq.fork()
    assert branch.pool is not llm.pool and branch.cache.nbytes == seq.cache.nbytes
    assert branch.pool.bytes_used == branch.pool.physical_nbytes() == seq.cache.nbytes
    for token in (5, 9, 11, 7, 3, 8):  # the branch runs ahead: the original must not notice
        branch_logits = branch.step(token)
    for layer in seq.cache.kv_layers:
        layer.check()
    original = [seq.step(t) for t in (5, 9, 11, 7, 3, 8)]
    torch.testing.assert_close(original[-1], branch_logits, rtol=0, atol=0)
    assert logits.shape == original[0].shape
    branch.release()
    assert branch.pool.bytes_used == 0 and seq.cache.nbytes == llm.pool.bytes_used
    seq.release()
