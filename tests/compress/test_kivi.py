"""KIVI: packed blocks round trip within the format's bound; real bytes; generation under a budget."""

import pytest
import torch

from kvmem.compress.kivi import KIVI
from kvmem.engine.llm import LLM
from kvmem.engine.sampling import SamplingParams, sample
from kvmem.kv.pool import block_nbytes
from kvmem.model.loader import LoadedModel


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_block_round_trip_within_half_a_step(bits: int) -> None:
    quant = KIVI(bits, group_size=32)
    layout = quant.layout(heads=3, block_size=64, head_dim=64)
    g = torch.Generator().manual_seed(bits)
    keys, values = torch.randn(3, 64, 64, generator=g), torch.randn(3, 64, 64, generator=g)
    keys[:, :, 7] *= 30  # an outlier channel: per-channel groups keep it from hurting the others
    buffer = torch.empty(layout.nbytes, dtype=torch.uint8)
    quant.encode(keys, values, layout, buffer)
    k2, v2 = quant.decode(buffer, layout, torch.float32)
    levels = (1 << bits) - 1
    # keys: per channel, groups of 32 tokens; values: per token, groups of 32 channels
    k_range = keys.unflatten(1, (2, 32)).amax(2) - keys.unflatten(1, (2, 32)).amin(2)  # [H, 2, D]
    k_bound = (k_range / levels / 2).repeat_interleave(32, dim=1) * 1.002 + 1e-3
    v_range = values.unflatten(2, (2, 32)).amax(3) - values.unflatten(2, (2, 32)).amin(3)  # [H, bs, 2]
    v_bound = (v_range / levels / 2).repeat_interleave(32, dim=2) * 1.002 + 1e-3
    assert bool(((k2 - keys).abs() <= k_bound).all())
    assert bool(((v2 - values).abs() <= v_bound).all())
    # codes + float16 stats: (bits + 1) bits per element with groups of 32
    assert layout.nbytes == 2 * 3 * 64 * 64 * (bits + 1) // 8
    assert layout.nbytes < block_nbytes(3, 64, 64, torch.float32)


@pytest.mark.parametrize("policy", ["kivi2", "kivi4", "snapkv+kivi4", "h2o+kivi2"])
def test_quantized_cache_holds_real_bytes_at_every_step(tiny: LoadedModel, policy: str) -> None:
    budget = 24 * 1024 if "+" in policy else None
    llm = LLM(tiny, block_size=4, kv_budget=budget, policy=policy, prefill_chunk=16)
    fp = LLM(tiny, block_size=4)
    seq, ref = llm.new_sequence(), fp.new_sequence()
    seq.token_ids = ref.token_ids = list(range(3, 43))
    logits = seq.prefill(16)
    ref.prefill(16)
    for _ in range(150):
        assert seq.cache.nbytes == llm.pool.bytes_used == llm.pool.physical_nbytes()
        assert budget is None or llm.pool.bytes_used <= budget
        llm.pool.check_integrity()
        token = sample(logits, SamplingParams(), None)
        logits = seq.step(token)
        ref.step(token)
    assert seq.cache.nbytes < ref.cache.nbytes / 2
    full_layers = [layer for layer in seq.cache.kv_layers if layer.window is None]
    assert any(p is not None for layer in full_layers for p in layer.stream().packed)
    seq.release()
    assert llm.pool.bytes_used == 0


def test_quantization_alone_refuses_what_does_not_fit(llama: LoadedModel) -> None:
    from kvmem.errors import KVBudgetError

    llm = LLM(llama, block_size=4, kv_budget="4KiB", policy="kivi4")
    with pytest.raises(KVBudgetError):
        llm.generate(list(range(3, 103)), max_new_tokens=10)
    assert llm.pool.bytes_used == 0


# KL gates on real text for every quantizer (KIVI included): tests/compress/test_kl_gates.py
