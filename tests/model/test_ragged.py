"""Per-head storage: heads keep different tokens, hold only their own blocks, attend correctly."""

import math

import torch

from kvmem.compress.observe import Observer, kvmem_sdpa
from kvmem.engine.llm import LLM
from kvmem.kv.pool import KVPool, PoolConfig
from kvmem.model.loader import LoadedModel
from kvmem.model.ragged import RaggedLayer

H, D, BS = 2, 8, 4


def _layer(tokens: int) -> tuple[RaggedLayer, torch.Tensor, torch.Tensor]:
    pool = KVPool(PoolConfig(block_size=BS))
    layer = RaggedLayer(pool, H, D, torch.float32)
    keys, values = torch.randn(1, H, tokens, D), torch.randn(1, H, tokens, D)
    layer.update(keys, values)
    return layer, keys, values


def test_heads_keep_different_tokens_and_only_their_blocks_are_held() -> None:
    torch.manual_seed(0)
    layer, keys, values = _layer(20)
    mask = torch.zeros(H, 20, dtype=torch.bool)
    mask[0, [0, 3, 4, 9, 12, 13, 17, 18, 19]] = True  # 9 tokens: 3 blocks
    mask[1, [2, 19]] = True  # 2 tokens: 1 block
    layer.compact_heads(mask)
    layer.check()
    assert layer.lengths == [9, 2]
    assert len(layer.heads[0].table.block_ids) == 3 and len(layer.heads[1].table.block_ids) == 1
    block = BS * D * 2 * 4  # one head's keys and values, float32
    assert layer.nbytes == layer.pool.bytes_used == layer.pool.physical_nbytes() == 4 * block
    k, v = layer.gather()  # [1, H, 9, D], head 1 padded at the front
    torch.testing.assert_close(k[0, 0], keys[0, 0, mask[0]])
    torch.testing.assert_close(v[0, 1, -2:], values[0, 1, mask[1]])
    assert not k[0, 1, :7].any()
    assert layer.valid().tolist() == [[True] * 9, [False] * 7 + [True] * 2]
    layer.release()
    assert layer.pool.bytes_used == 0


class _Attention(torch.nn.Module):
    layer_idx = 0
    is_causal = True
    num_key_value_groups = 2


def test_attention_sees_each_head_s_own_tokens_and_never_the_padding() -> None:
    torch.manual_seed(1)
    layer, keys, values = _layer(12)
    mask = torch.zeros(H, 12, dtype=torch.bool)
    mask[0, :10] = True
    mask[1, [1, 6, 11]] = True
    layer.compact_heads(mask)

    class Cache:
        layers = [layer]  # noqa: RUF012

    q_len, hq = 3, 2 * H
    new_k, new_v = torch.randn(1, H, q_len, D), torch.randn(1, H, q_len, D)
    k, v = layer.update(new_k, new_v)  # [1, H, 13, D]
    query = torch.randn(1, hq, q_len, D)
    out, _ = kvmem_sdpa(
        _Attention(), query, k, v, None, scaling=D**-0.5, kvmem_observer=Observer(Cache(), 0, False)
    )  # out: [1, q, Hq, D]
    for qh in range(hq):
        h = qh // 2
        held_k = torch.cat([keys[0, h, mask[h]], new_k[0, h]])  # [n, D]
        held_v = torch.cat([values[0, h, mask[h]], new_v[0, h]])
        n = held_k.shape[0]
        logits = query[0, qh] @ held_k.T / math.sqrt(D)  # [q, n]
        causal = torch.arange(n).view(1, n) > (n - q_len + torch.arange(q_len)).view(q_len, 1)
        expected = torch.softmax(logits.masked_fill(causal, float("-inf")), dim=-1) @ held_v
        torch.testing.assert_close(out[0, :, qh], expected, rtol=1e-5, atol=1e-5)


def test_adakv_gives_heads_uneven_shares_within_the_layer_budget(tiny: LoadedModel) -> None:
    llm = LLM(tiny, block_size=4, kv_budget="32tok", policy="snapkv+adakv")
    seq = llm.new_sequence()
    seq.token_ids = list(range(3, 150))
    seq.prefill(16)
    ragged = [layer for layer in seq.cache.paged_layers if isinstance(layer, RaggedLayer)]
    assert ragged
    for layer in ragged:
        layer.check()
        assert sum(layer.lengths) <= 32 * layer.num_heads
    assert any(len(set(layer.lengths)) > 1 for layer in ragged)  # really adaptive
    assert seq.cache.nbytes == llm.pool.bytes_used == llm.pool.physical_nbytes()
    seq.release()
    assert llm.pool.bytes_used == 0
