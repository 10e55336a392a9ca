"""On the embedded real models, kvmem without compression is transformers, token for token."""

import pytest
import torch
from transformers import DynamicCache

from kvmem.engine.llm import LLM
from kvmem.model.cache_arg import cache_kwargs
from kvmem.model.loader import LoadedModel
from texts import SHORT_PROMPTS, long_prompt

pytestmark = pytest.mark.real


def reference(loaded: LoadedModel, ids: list[int], max_new_tokens: int) -> list[int]:
    out = loaded.model.generate(
        torch.tensor([ids]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        **cache_kwargs(loaded.model, DynamicCache(config=loaded.model.config)),
    )
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("index", range(len(SHORT_PROMPTS) + 1))
def test_greedy_output_is_token_identical_to_transformers(real: LoadedModel, index: int) -> None:
    llm = LLM(real, prefill_chunk=512)
    if index < len(SHORT_PROMPTS):
        ids, new = llm.encode(SHORT_PROMPTS[index]), 24
    else:
        ids, new = long_prompt(real), 12
    result = llm.generate(ids, max_new_tokens=new)
    expected = reference(real, ids, new)
    assert result.token_ids == expected
    assert result.stats.tokens_prefilled == len(ids)
    assert llm.pool.bytes_used == 0, "a finished request gives its blocks back"
    llm.pool.check_integrity()


def test_prefill_logits_match_transformers(real: LoadedModel) -> None:
    ids = long_prompt(real)[:700]  # 3 chunks of 256; all logits of Gemma's 262k vocabulary are large
    llm = LLM(real, prefill_chunk=256)
    sequence = llm.new_sequence()
    sequence.token_ids = list(ids)
    ours = sequence.prefill(llm.config.prefill_chunk, all_logits=True)  # [T, V]
    assert sequence.cache.nbytes == llm.pool.physical_nbytes() == llm.pool.bytes_used
    with torch.inference_mode():
        theirs = real.model(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    sequence.release()


def test_gemma_tokenizer_is_bpe_with_usual_ids(gemma3: LoadedModel) -> None:
    # Gemma 3's tokenizer must keep common words whole (BPE with byte fallback), not split them.
    ids = gemma3.tokenizer("The capital of France is")["input_ids"]
    assert ids == [2, 818, 5279, 529, 7001, 563]


def test_gemma_sliding_layers_hold_only_the_window(gemma3: LoadedModel) -> None:
    llm = LLM(gemma3)
    sequence = llm.new_sequence()
    sequence.token_ids = long_prompt(gemma3)
    sequence.prefill(512)
    n = len(sequence.token_ids)
    for layer, window in zip(sequence.cache.kv_layers, gemma3.spec.windows):
        if window is None:
            assert layer.table.num_held == n
        else:
            assert layer.table.num_held < window - 1 + llm.pool.block_size
    # 15 of 18 layers slide (window 512): far less than a full cache of ~2.1k tokens
    assert sequence.cache.nbytes < 0.45 * n * gemma3.spec.kv_bytes_per_token
    sequence.release()
