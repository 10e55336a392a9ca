"""bfloat16 end to end: weights and KV in bfloat16, greedy output identical to transformers in bfloat16."""

from __future__ import annotations

import copy

import pytest
import torch

from kvmem.engine.llm import LLM
from kvmem.model import kernel
from kvmem.model.dtype import UnsupportedDtypeError, resolve_dtype
from kvmem.model.loader import LoadedModel
from kvmem.model.spec import ModelSpec


def in_bf16(loaded: LoadedModel) -> LoadedModel:
    model = copy.deepcopy(loaded.model).to(torch.bfloat16)
    spec = ModelSpec.from_config(model.config, torch.bfloat16)
    return LoadedModel(loaded.name, model, loaded.tokenizer, spec, loaded.has_chat_template)


def reference(loaded: LoadedModel, ids: list[int], n: int) -> list[int]:
    out = loaded.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


def test_bfloat16_greedy_output_equals_transformers_in_bfloat16(tiny: LoadedModel) -> None:
    bf16 = in_bf16(tiny)
    llm = LLM(bf16, block_size=4)
    prompts = [list(range(3, 3 + n)) for n in (7, 60, 130)]
    for ids in prompts:
        assert llm.generate(ids, max_new_tokens=20).token_ids == reference(bf16, ids, 20)
    assert llm.config.dtype == "bfloat16"
    seq = llm.new_sequence()
    seq.token_ids = prompts[1]
    seq.prefill(512)
    layer = seq.cache.kv_layers[-1].stream()  # a full-attention layer in both tiny models
    assert layer.dtype == torch.bfloat16
    assert layer.block_bytes == 2 * tiny.spec.num_kv_heads * 4 * tiny.spec.head_dim * 2  # 2 bytes each
    assert seq.cache.nbytes == llm.pool.physical_nbytes()
    seq.release()


def test_quantized_and_evicting_policies_run_in_bfloat16(llama: LoadedModel) -> None:
    bf16 = in_bf16(llama)
    for policy, budget in (("kivi4", None), ("snapkv+kivi4", 16 * 1024), ("bfp4", None)):
        llm = LLM(bf16, block_size=4, policy=policy, kv_budget=budget)
        result = llm.generate(list(range(3, 120)), max_new_tokens=24)
        assert len(result.token_ids) == 24 and llm.pool.bytes_used == 0


def test_dtype_names() -> None:
    assert resolve_dtype("float32") is torch.float32 and resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("auto", "cpu") in (torch.float32, torch.bfloat16)
    assert resolve_dtype("auto", "cuda") is torch.bfloat16
    with pytest.raises(UnsupportedDtypeError, match="float16"):
        resolve_dtype("float16")


@pytest.mark.real
def test_smollm2_in_bfloat16_matches_transformers(smollm2: LoadedModel) -> None:
    """Through PyTorch's attention (what transformers runs) kvmem is transformers, token for token.
    The compiled kernel sums in float32 where SDPA rounds to bfloat16, and bfloat16 logits tie
    often (two best logits equal); its tokens must match up to the first such near-tie."""
    bf16 = in_bf16(smollm2)
    llm = LLM(bf16)
    ids = llm.encode("The three primary colors are")
    out = bf16.model.generate(
        torch.tensor([ids]),
        max_new_tokens=16,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    expected = out.sequences[0, len(ids) :].tolist()
    with kernel.disabled():
        assert llm.generate(ids, max_new_tokens=16).token_ids == expected
    got = llm.generate(ids, max_new_tokens=16).token_ids
    differ = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
    if differ is not None:
        top = torch.topk(out.scores[differ][0].float(), 2).values
        step = 2.0 ** (torch.floor(torch.log2(top[0].abs())) - 7)  # one bfloat16 step at that logit
        assert float(top[0] - top[1]) <= float(step), f"tokens differ at step {differ}, not at a near-tie"
