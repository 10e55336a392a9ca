"""KVMemCache against transformers' own cache, on tiny random models (llama: full; gemma: sliding)."""

import pytest
import torch
from transformers import DynamicCache

from kvmem.errors import KVBudgetError
from kvmem.kv.pool import KVPool, PoolConfig
from kvmem.model.cache import KVMemCache
from kvmem.model.cache_arg import cache_kwargs
from kvmem.model.loader import LoadedModel

PROMPT = torch.randint(0, 250, (1, 61), generator=torch.Generator().manual_seed(3))


def run_chunks(loaded: LoadedModel, cache: object, chunk: int) -> torch.Tensor:
    # returns logits [61, V] of every prompt position, computed chunk by chunk
    with torch.inference_mode():
        outs = [
            loaded.model(
                input_ids=PROMPT[:, s : s + chunk], use_cache=True, **cache_kwargs(loaded.model, cache)
            ).logits[0]
            for s in range(0, PROMPT.shape[1], chunk)
        ]
    return torch.cat(outs)


@pytest.mark.parametrize("chunk", [1, 3, 7, 16, 61])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_logits_match_transformers_cache(tiny: LoadedModel, chunk: int, block_size: int) -> None:
    pool = KVPool(PoolConfig(block_size=block_size))
    ours = run_chunks(tiny, KVMemCache(pool, tiny.spec), chunk)
    reference = run_chunks(tiny, DynamicCache(config=tiny.model.config), chunk)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    pool.check_integrity()


def test_bytes_reported_equal_bytes_held(tiny: LoadedModel) -> None:
    pool = KVPool(PoolConfig(block_size=4))
    cache = KVMemCache(pool, tiny.spec)
    run_chunks(tiny, cache, 5)
    assert cache.nbytes == pool.bytes_used == pool.physical_nbytes() > 0
    pool.check_integrity()
    cache.release()
    assert pool.bytes_used == pool.physical_nbytes() == 0
    pool.check_integrity()


def test_sliding_layers_hold_only_their_window(gemma: LoadedModel) -> None:
    pool = KVPool(PoolConfig(block_size=4))
    cache = KVMemCache(pool, gemma.spec)
    run_chunks(gemma, cache, 5)
    window = gemma.spec.windows[0]
    assert window is not None
    for layer, layer_window in zip(cache.kv_layers, gemma.spec.windows):
        held = layer.table.num_held
        if layer_window is None:
            assert held == PROMPT.shape[1]
        else:
            # the window's last (window - 1) tokens, plus at most one partly used block
            assert window - 1 <= held < window - 1 + pool.block_size
    full_bytes = PROMPT.shape[1] * gemma.spec.kv_bytes_per_token
    assert cache.nbytes < full_bytes / 2  # 3 of 4 layers slide: real memory saved


def test_bytes_needed_is_exact(tiny: LoadedModel) -> None:
    """A budget of exactly bytes_needed admits the prompt; one block less does not."""
    probe = KVMemCache(KVPool(PoolConfig(block_size=4)), tiny.spec)
    needed = probe.bytes_needed(PROMPT.shape[1])
    pool = KVPool(PoolConfig(budget=needed, block_size=4))
    run_chunks(tiny, KVMemCache(pool, tiny.spec), PROMPT.shape[1])
    assert pool.bytes_used <= needed
    pool.check_integrity()

    small = KVPool(PoolConfig(budget=needed - 1, block_size=4))
    with pytest.raises(KVBudgetError):
        run_chunks(tiny, KVMemCache(small, tiny.spec), PROMPT.shape[1])
    assert small.bytes_used <= needed - 1
    small.check_integrity()


def test_batch_size_above_one_is_refused(llama: LoadedModel) -> None:
    cache = KVMemCache(KVPool(PoolConfig()), llama.spec)
    with pytest.raises(ValueError, match="batch size 1"):
        llama.model(input_ids=torch.zeros((2, 3), dtype=torch.long), **cache_kwargs(llama.model, cache))


@pytest.mark.parametrize("chunk", [1, 5, 13, 61])
def test_bytes_to_grow_bounds_every_chunking(tiny: LoadedModel, chunk: int) -> None:
    """The reservation for n tokens is never exceeded, whatever the chunk size."""
    probe = KVMemCache(KVPool(PoolConfig(block_size=4)), tiny.spec)
    bound = probe.bytes_to_grow(PROMPT.shape[1])
    pool = KVPool(PoolConfig(budget=bound, block_size=4))
    cache = KVMemCache(pool, tiny.spec)
    run_chunks(tiny, cache, chunk)
    assert pool.bytes_used <= bound
    pool.check_integrity()
