"""transformers' peers: bytes a quantized cache really stores, and a clear refusal without its backend."""

import sys

import pytest
import torch

from kvmem.bench.config import BenchConfig
from kvmem.bench.hf_peer import PeerUnavailableError, cache_bytes, peer_cache, tensor_bytes
from kvmem.bench.run import run_bench
from kvmem.engine.llm import LLM
from kvmem.model.cache_arg import cache_kwargs
from kvmem.model.loader import LoadedModel


def test_quanto_tensor_counts_its_packed_codes_scales_and_zero_points() -> None:
    pytest.importorskip("optimum.quanto")
    from optimum.quanto import MaxOptimizer, qint4, quantize_weight

    x = torch.randn(48, 64)  # [rows, channels]: groups of 64 along the channels
    scale, shift = MaxOptimizer()(x, qint4, 0, 64)
    q = quantize_weight(x, qint4, 0, scale, shift, 64)
    # 4-bit codes two per byte, plus a float32 scale and zero point per group of 64
    assert tensor_bytes(q) == 48 * 64 // 2 + 48 * 4 + 48 * 4
    assert tensor_bytes(x) == 48 * 64 * 4 and tensor_bytes(None) == 0


def test_quantized_cache_holds_fewer_bytes_than_the_dynamic_cache(llama: LoadedModel) -> None:
    pytest.importorskip("optimum.quanto")
    from transformers import DynamicCache

    llm = LLM(llama)
    ids = torch.randint(0, 100, (1, 300))
    quantized, dynamic = peer_cache(llm, "hf-quanto4"), DynamicCache(config=llama.model.config)
    assert peer_cache(llm, "hf") is None  # plain generate() makes its own DynamicCache
    with torch.inference_mode():
        llama.model(ids, use_cache=True, **cache_kwargs(llama.model, quantized))
        llama.model(ids, use_cache=True, **cache_kwargs(llama.model, dynamic))
    spec = llama.spec
    assert cache_bytes(dynamic) == 300 * spec.kv_bytes_per_token
    assert 0 < cache_bytes(quantized) < cache_bytes(dynamic) / 3  # 4 bits + stats, 128 recent tokens


def test_without_optimum_quanto_the_peer_is_refused_with_the_fix(
    llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)  # import fails as if not installed
    with pytest.raises(PeerUnavailableError, match=r"kvmem\[peers\]"):
        peer_cache(LLM(llama), "hf-quanto2")
    config = BenchConfig(model="tiny", methods=("full", "hf-quanto4"), tasks=("passkey",), length=320,
                         block_size=16, prefill_chunk=64, speed_lengths=())  # fmt: skip
    records = run_bench(config, model=llama, progress=False).records
    refused = [r for r in records if r.method == "hf-quanto4"]
    assert len(refused) == 1 and refused[0].error is not None and "optimum-quanto" in refused[0].error


def test_a_model_the_quantized_cache_does_not_support_is_refused_not_fatal(gemma: LoadedModel) -> None:
    pytest.importorskip("optimum.quanto")
    with pytest.raises(PeerUnavailableError, match="refuses this model"):
        peer_cache(LLM(gemma), "hf-quanto4")  # sliding-window layers: transformers says no
    config = BenchConfig(model="tiny", methods=("full", "hf-quanto4"), tasks=("passkey", "realtext"),
                         length=320, block_size=16, prefill_chunk=64, speed_lengths=())  # fmt: skip
    records = run_bench(config, model=gemma, progress=False).records  # the run goes on
    refused = [r for r in records if r.method == "hf-quanto4"]
    assert len(refused) == 2 and all(r.error and "sliding" in r.error for r in refused)
    assert all(r.error is None for r in records if r.method == "full")


def test_unknown_transformers_peer_is_rejected() -> None:
    with pytest.raises(ValueError, match="hf-quanto4"):
        BenchConfig(methods=("full", "hf-quanto3"))
