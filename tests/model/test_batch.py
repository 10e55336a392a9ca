"""One forward over several sequences gives each the logits it gets alone (tiny models, float32)."""

import pytest
import torch

from kvmem.kv.pool import KVPool, PoolConfig
from kvmem.model.attention import register
from kvmem.model.batch import Row, forward
from kvmem.model.cache import KVMemCache
from kvmem.model.loader import LoadedModel

LENGTHS = (5, 40, 17, 90)


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("block_size", [4, 16])
def test_batched_logits_match_each_sequence_alone(tiny: LoadedModel, block_size: int) -> None:
    tiny.model.set_attn_implementation(register())
    prompts = [_prompt(n, i) for i, n in enumerate(LENGTHS)]
    pool = KVPool(PoolConfig(block_size=block_size))
    alone = [KVMemCache(pool, tiny.spec) for _ in prompts]
    batched = [KVMemCache(pool, tiny.spec) for _ in prompts]
    with torch.inference_mode():
        # prefill: each alone in chunks of 16; together in one forward of every whole prompt
        expected = []
        for cache, prompt in zip(alone, prompts):
            for start in range(0, len(prompt), 16):
                (last,) = forward(tiny.model, [Row(cache, prompt[start : start + 16])])
            expected.append(last)
        got = forward(tiny.model, [Row(cache, prompt) for cache, prompt in zip(batched, prompts)])
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-4)
        tokens = [int(e.argmax()) for e in expected]
        # decode: 12 steps, every sequence one token per forward, all in one padded attention call
        for _ in range(12):
            expected = [forward(tiny.model, [Row(c, [t])])[0] for c, t in zip(alone, tokens)]
            got = forward(tiny.model, [Row(c, [t]) for c, t in zip(batched, tokens)])
            for e, g in zip(expected, got):
                torch.testing.assert_close(g, e, rtol=0, atol=1e-4)
            tokens = [int(e.argmax()) for e in expected]
        # mixed: two decode, two prefill chunks in one forward
        more = [_prompt(7, 10), _prompt(23, 11)]
        expected = [forward(tiny.model, [Row(alone[0], [tokens[0]])])[0]]
        expected.append(forward(tiny.model, [Row(alone[1], more[0])])[0])
        expected.append(forward(tiny.model, [Row(alone[2], [tokens[2]])])[0])
        expected.append(forward(tiny.model, [Row(alone[3], more[1])])[0])
        rows = [
            Row(batched[0], [tokens[0]]),
            Row(batched[1], more[0]),
            Row(batched[2], [tokens[2]]),
            Row(batched[3], more[1]),
        ]
        for e, g in zip(expected, forward(tiny.model, rows)):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-4)
    for a, b in zip(alone, batched):  # (a sliding layer's bytes depend on how its tokens were chunked)
        assert a.num_tokens == b.num_tokens
        a.release()
        b.release()
    pool.check_integrity()
    assert pool.bytes_used == 0


def test_all_logits_of_a_chunk_match_the_model_without_a_cache(llama: LoadedModel) -> None:
    llama.model.set_attn_implementation(register())
    prompt = _prompt(33, 1)
    cache = KVMemCache(KVPool(PoolConfig(block_size=4)), llama.spec)
    with torch.inference_mode():
        (ours,) = forward(llama.model, [Row(cache, prompt, all_logits=True)])  # [33, V]
        reference = llama.model(torch.tensor([prompt])).logits[0].float()
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)
