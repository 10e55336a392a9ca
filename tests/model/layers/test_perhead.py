"""Per-head storage: heads keep different tokens, hold only their own blocks, attend correctly."""

import math

import torch

from kvmem.engine.llm import LLM
from kvmem.kv.pool import KVPool, PoolConfig
from kvmem.model.batch import ForwardBatch, Row
from kvmem.model.cache import KVMemCache
from kvmem.model.layers import LayerSpec, PerHeadLayer
from kvmem.model.loader import LoadedModel
from kvmem.model.spec import ModelSpec

H, D, BS = 2, 8, 4
SPEC = ModelSpec("test", 1, H, 2 * H, D, (None,), 0, torch.float32)


def _cache(tokens: int) -> tuple[KVMemCache, torch.Tensor, torch.Tensor]:
    pool = KVPool(PoolConfig(block_size=BS))
    cache = KVMemCache(pool, SPEC, [LayerSpec("perhead")])
    keys, values = torch.randn(H, tokens, D), torch.randn(H, tokens, D)
    cache.kv_layers[0].write(keys, values)
    return cache, keys, values


def test_heads_keep_different_tokens_and_only_their_blocks_are_held() -> None:
    torch.manual_seed(0)
    cache, keys, values = _cache(20)
    layer = cache.kv_layers[0]
    assert isinstance(layer, PerHeadLayer)
    mask = torch.zeros(H, 20, dtype=torch.bool)
    mask[0, [0, 3, 4, 9, 12, 13, 17, 18, 19]] = True  # 9 tokens: 3 blocks
    mask[1, [2, 19]] = True  # 2 tokens: 1 block
    layer.keep_mask(mask)
    layer.check()
    assert layer.lengths == [9, 2]
    assert len(layer.heads[0].table.block_ids) == 3 and len(layer.heads[1].table.block_ids) == 1
    block = BS * D * 2 * 4  # one head's keys and values, float32
    assert layer.nbytes == layer.pool.bytes_used == layer.pool.physical_nbytes() == 4 * block
    k, v = layer.gather()  # [H, 9, D], head 1 padded at the front
    torch.testing.assert_close(k[0], keys[0, mask[0]])
    torch.testing.assert_close(v[1, -2:], values[1, mask[1]])
    assert not k[1, :7].any()
    assert layer.valid().tolist() == [[True] * 9, [False] * 7 + [True] * 2]
    layer.release()
    assert layer.pool.bytes_used == 0


class _Attention(torch.nn.Module):
    layer_idx = 0


def test_attention_sees_each_head_s_own_tokens_and_never_the_padding() -> None:
    torch.manual_seed(1)
    cache, keys, values = _cache(12)
    layer = cache.kv_layers[0]
    mask = torch.zeros(H, 12, dtype=torch.bool)
    mask[0, :10] = True
    mask[1, [1, 6, 11]] = True
    layer.keep_mask(mask)
    hq = 2 * H
    for q_len in (3, 1):  # a chunk attends on its own; single tokens in the batched path
        new_k, new_v = torch.randn(1, H, q_len, D), torch.randn(1, H, q_len, D)
        query = torch.randn(1, hq, q_len, D)
        batch = ForwardBatch([Row(cache, [0] * q_len)])
        batch.update(new_k, new_v, 0)
        out = batch.attend(0, query, new_k, new_v, D**-0.5)  # [1, q, Hq, D]
        for qh in range(hq):
            h = qh // 2
            held_k = torch.cat([keys[h, mask[h]], new_k[0, h]])  # [n, D]
            held_v = torch.cat([values[h, mask[h]], new_v[0, h]])
            n = held_k.shape[0]
            logits = query[0, qh] @ held_k.T / math.sqrt(D)  # [q, n]
            causal = torch.arange(n).view(1, n) > (n - q_len + torch.arange(q_len)).view(q_len, 1)
            expected = torch.softmax(logits.masked_fill(causal, float("-inf")), dim=-1) @ held_v
            torch.testing.assert_close(out[0, :, qh], expected, rtol=1e-5, atol=1e-5)
        keys = torch.cat([keys, new_k[0]], dim=1)  # the new tokens are held by every head now
        values = torch.cat([values, new_v[0]], dim=1)
        mask = torch.cat([mask, torch.ones(H, q_len, dtype=torch.bool)], dim=1)


def test_adakv_gives_heads_uneven_shares_within_the_layer_budget(tiny: LoadedModel) -> None:
    llm = LLM(tiny, block_size=4, kv_budget="32tok", policy="snapkv+adakv")
    seq = llm.new_sequence()
    seq.token_ids = list(range(3, 150))
    seq.prefill(16)
    perhead = [layer for layer in seq.cache.kv_layers if isinstance(layer, PerHeadLayer)]
    assert perhead
    for layer in perhead:
        layer.check()
        assert sum(layer.lengths) <= 32 * layer.num_heads
    assert any(len(set(layer.lengths)) > 1 for layer in perhead)  # really adaptive
    assert seq.cache.nbytes == llm.pool.bytes_used == llm.pool.physical_nbytes()
    seq.release()
    assert llm.pool.bytes_used == 0
