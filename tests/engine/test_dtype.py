"""bfloat16 end to end: weights and KV in bfloat16, greedy output identical to transformers in bfloat16."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

import kvmem
from kvmem.engine.llm import LLM
from kvmem.model import kernel
from kvmem.model.device import UnsupportedDeviceError
from kvmem.model.dtype import UnsupportedDtypeError, resolve_dtype
from kvmem.model.loader import LoadedModel
from kvmem.model.spec import ModelSpec

DATA = Path(kvmem.__file__).parent / "data"


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
    if torch.cuda.is_available():
        assert resolve_dtype("auto", "cuda") is torch.bfloat16
    else:  # auto cannot be judged for a device this machine lacks
        with pytest.raises(UnsupportedDeviceError, match="not available"):
            resolve_dtype("auto", "cuda")
    with pytest.raises(UnsupportedDtypeError, match="float16"):
        resolve_dtype("float16")


def bf16_step(logits: torch.Tensor) -> float:
    """One bfloat16 step at the largest of ``logits``: the resolution a tie is judged at."""
    top = float(logits.float().abs().max())
    return 2.0 ** (math.floor(math.log2(top)) - 7)


def agree_until_tie(got: list[int], expected: list[int], scores: list[torch.Tensor], tie: float) -> None:
    """``got`` equals ``expected`` up to the first step where transformers' own two best logits
    are within ``tie`` of each other (from there on either token is a fair greedy pick)."""
    for i, (a, b) in enumerate(zip(got, expected)):
        top = torch.topk(scores[i].float(), 2).values
        if float(top[0] - top[1]) <= tie:
            return
        assert a == b, (
            f"tokens differ at step {i}, where transformers' best two are {float(top[0] - top[1])} apart"
        )
    assert len(got) == len(expected)


@pytest.mark.real
def test_smollm2_in_bfloat16_matches_transformers(smollm2: LoadedModel) -> None:
    """Through PyTorch's attention (what transformers runs) kvmem computes what transformers
    computes, in the same layout: a sequence's keys followed by the new token's, not the pool's
    whole blocks with their unfilled tails masked (same sums in exact arithmetic, but SDPA then
    splits the keys elsewhere and its online softmax rounds otherwise in bfloat16: that drift of a
    few bfloat16 steps is what made tokens part at a near-tie on CPUs with AMX). So its logits
    stay within one bfloat16 step of transformers' at every step (teacher-forced, so a real
    difference in positions or masks, worth whole logits, cannot hide), and its greedy tokens
    equal transformers' up to the first step where transformers' own best two logits are within
    one bfloat16 step. The compiled kernel sums in float32: its logits may differ by as much as
    transformers' own two paths differ (cached decode against one forward over the whole text),
    and its tokens are held to the same rule at that tolerance."""
    bf16 = in_bf16(smollm2)
    llm = LLM(bf16)
    ids = llm.encode("The three primary colors are")
    n = 16
    out = bf16.model.generate(
        torch.tensor([ids]),
        max_new_tokens=n,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    expected = out.sequences[0, len(ids) :].tolist()
    scores = [s[0].float() for s in out.scores]  # [V] per step: the logits greedy search saw
    with torch.inference_mode():
        whole = bf16.model(out.sequences).logits[0, len(ids) - 1 : -1].float()  # [n, V]
    noise = max(float((w - s).abs().max()) for w, s in zip(whole, scores))
    with kernel.disabled():
        agree_until_tie(llm.generate(ids, max_new_tokens=n).token_ids, expected, scores, bf16_step(scores[0]))
        seq = llm.new_sequence()
        seq.token_ids = list(ids)
        forced = [seq.prefill(512)] + [seq.step(t) for t in expected[:-1]]
        seq.release()
    for i, (a, b) in enumerate(zip(forced, scores)):
        assert float((a - b).abs().max()) <= bf16_step(b), f"logits at step {i} beyond one bfloat16 step"
    agree_until_tie(
        llm.generate(ids, max_new_tokens=n).token_ids, expected, scores, max(noise, bf16_step(scores[0]))
    )


@pytest.mark.real
def test_a_prefix_read_back_in_bfloat16_gives_the_cold_runs_tokens(
    smollm2: LoadedModel, tmp_path: Path
) -> None:
    """The reported case: a prompt run twice with a disk cache, bfloat16. The second run reuses
    whole prefill chunks only (``exact_reuse``), so it computes the rest in the chunk the first run
    computed it in, and its greedy tokens are the first run's (on CPUs with AMX, reusing every
    whole block made them part from the 8th token on)."""
    bf16 = in_bf16(smollm2)
    text = (DATA / "harbor_town.txt").read_text()
    ids = bf16.tokenizer(text)["input_ids"][:300]
    cold = LLM(bf16, prefill_chunk=128, disk_cache=tmp_path).generate(ids, max_new_tokens=24)
    warm = LLM(bf16, prefill_chunk=128, disk_cache=tmp_path).generate(ids, max_new_tokens=24)  # empty RAM
    assert cold.stats.tokens_reused == 0
    assert warm.stats.tokens_reused == warm.stats.tokens_from_disk == 256  # two whole chunks of 128
    assert warm.token_ids == cold.token_ids
