"""One matrix over every registered policy: budgets hold, bytes are real, 100% changes nothing."""

import pytest
import torch
from transformers import DynamicCache

from kvmem.compress.budget import KVBudget
from kvmem.compress.registry import SCORERS, UnknownPolicyError, make_policy
from kvmem.engine.llm import LLM
from kvmem.engine.sampling import SamplingParams, sample
from kvmem.errors import InvalidBudgetError, KVBudgetError
from kvmem.model.cache_arg import cache_kwargs
from kvmem.model.layers import MixedLayer
from kvmem.model.loader import LoadedModel

POLICIES = sorted(SCORERS)
PROMPT = list(range(3, 43))  # 40 tokens


@pytest.mark.parametrize(
    "policy",
    [
        *POLICIES,
        "snapkv+merge",
        "h2o+pyramid",
        "keynorm+cake",
        "snapkv+adakv",
        "h2o+mixed",
        "h2o+mixed-rotk3v2",
    ],
)
@pytest.mark.parametrize("budget", ["100%", "1MiB"])
def test_full_budget_reproduces_uncompressed_output(tiny: LoadedModel, policy: str, budget: str) -> None:
    if "mixed" in policy and budget.endswith("%"):
        pytest.skip("mixed precision takes byte or token budgets")
    ids = list(range(3, 150))
    expected = LLM(tiny, block_size=4).generate(ids, max_new_tokens=30).token_ids
    llm = LLM(tiny, block_size=4, kv_budget=budget, policy=policy)
    assert llm.generate(ids, max_new_tokens=30).token_ids == expected


COMBINATIONS = [
    "snapkv+merge",
    "h2o+pyramid",
    "snapkv+pyramid+kivi4",
    "tova+merge+kivi2",
    "snapkv+cake",
    "h2o+cake",
    "snapkv+adakv",
    "h2o+pyramid+adakv+kivi4",
    "h2o+mixed",
    "snapkv+mixed+kivi4",
    "snapkv+mixed-rot2+kivi8",
    "snapkv+bfp4",
    "snapkv+rotk3v2+res8",
    "snapkv+mixed-rot2+rotk4v2+res8",
]


@pytest.mark.parametrize("policy", POLICIES + COMBINATIONS)
def test_byte_budget_holds_at_every_step_for_200_tokens_past_it(tiny: LoadedModel, policy: str) -> None:
    budget = 16 * 1024  # far below the 240 tokens this run sees
    llm = LLM(tiny, block_size=4, kv_budget=budget, policy=policy, prefill_chunk=16)
    seq = llm.new_sequence()
    seq.token_ids = list(PROMPT)
    logits = seq.prefill(llm.config.prefill_chunk)
    for _ in range(200):
        assert llm.pool.bytes_used <= budget
        assert seq.cache.nbytes == llm.pool.bytes_used == llm.pool.physical_nbytes()
        llm.pool.check_integrity()
        for layer in seq.cache.kv_layers:
            layer.check()
        logits = seq.step(sample(logits, SamplingParams(), None))
    assert seq.num_cached == len(PROMPT) + 200
    full = seq.num_cached * tiny.spec.kv_bytes_per_token
    assert seq.cache.nbytes <= budget < full / 2  # really compressed
    seq.release()
    assert llm.pool.bytes_used == 0


@pytest.mark.parametrize("policy", POLICIES)
def test_token_and_fraction_budgets(llama: LoadedModel, policy: str) -> None:
    by_tokens = LLM(llama, block_size=4, kv_budget="48tok", policy=policy)
    seq = by_tokens.new_sequence()
    seq.token_ids = list(range(3, 160))
    seq.prefill(64)
    assert all(layer.held <= 48 for layer in seq.cache.kv_layers)
    seq.release()

    by_share = LLM(llama, block_size=4, kv_budget="25%", policy=policy)
    seq = by_share.new_sequence()
    seq.token_ids = list(range(3, 160))
    seq.prefill(64)
    for layer in seq.cache.kv_layers:
        assert layer.held <= 0.25 * 157 + 4
    seq.release()


def test_streamingllm_keeps_sinks_and_the_recent_window(llama: LoadedModel) -> None:
    ids = torch.tensor([list(range(3, 103))])
    reference = DynamicCache(config=llama.model.config)
    with torch.inference_mode():
        llama.model(ids, **cache_kwargs(llama.model, reference))
    llm = LLM(llama, block_size=4, kv_budget="40tok", policy="streamingllm", prefill_chunk=8)
    seq = llm.new_sequence()
    seq.token_ids = ids[0].tolist()
    seq.prefill(8)
    # layer 0's keys depend only on the token and its position, so they identify the tokens kept
    held, _ = seq.cache.kv_layers[0].past().dense()  # [H, T, D]
    n = held.shape[1]
    assert 20 <= n <= 40
    kept = list(range(4)) + list(range(100 - (n - 4), 100))
    torch.testing.assert_close(held, reference.layers[0].keys[0][:, kept], rtol=0, atol=1e-6)
    seq.release()


def test_compaction_keeps_different_tokens_per_head(llama: LoadedModel) -> None:
    llm = LLM(llama, block_size=4)
    seq = llm.new_sequence()
    seq.token_ids = list(range(3, 30))
    seq.prefill(64)
    layer = seq.cache.kv_layers[0]
    before, _ = layer.past().dense()  # [H, T, D]
    keep = torch.tensor([[0, 5, 6, 20, 26], [1, 2, 3, 4, 25]])
    layer.keep_slots(keep)
    after, _ = layer.past().dense()
    for h in range(2):
        torch.testing.assert_close(after[h], before[h, keep[h]])
    assert len(layer.table.block_ids) == 2 and layer.table.num_held == 5
    assert seq.cache.nbytes == llm.pool.physical_nbytes()
    seq.release()


def test_bad_policy_input() -> None:
    with pytest.raises(UnknownPolicyError, match="known policies"):
        LLM.__new__(LLM).__init__("smollm2-135m", policy="nope")
    with pytest.raises(InvalidBudgetError, match="needs a compression policy"):
        LLM.__new__(LLM).__init__("smollm2-135m", kv_budget="25%")
    with pytest.raises(InvalidBudgetError):
        KVBudget.parse("150%")
    with pytest.raises(InvalidBudgetError, match="bytes or tokens"):
        make_policy("h2o+mixed", KVBudget.parse("25%"))
    for spec, why in [
        ("tova+adakv", "scores every head alike"),
        ("streamingllm+adakv", "scores every head alike"),
        ("snapkv+adakv+merge", "cannot be combined with merging"),
        ("adakv", "needs an eviction method"),
        ("snapkv+h2o", "at most one"),
        ("h2o+adakv+mixed", "cannot be combined"),
        ("h2o+mixed-kivi3", "names no block format"),
    ]:
        with pytest.raises(UnknownPolicyError, match=why):
            make_policy(spec, KVBudget.parse("25%"))


def test_budget_too_small_for_any_cache(gemma: LoadedModel) -> None:
    llm = LLM(gemma, block_size=4, kv_budget=1024, policy="streamingllm")
    with pytest.raises(KVBudgetError, match="policy streamingllm"):
        llm.generate(PROMPT, max_new_tokens=5)


@pytest.mark.real
@pytest.mark.parametrize("policy", ["streamingllm", "snapkv", "h2o"])
def test_real_model_generates_within_a_byte_budget(smollm2: LoadedModel, policy: str) -> None:
    from texts import long_text

    llm = LLM(smollm2, kv_budget="12MiB", policy=policy)
    ids = llm.encode(long_text(6000))[:1200]
    result = llm.generate(ids, max_new_tokens=40)
    assert result.stats.new_tokens == 40
    assert result.stats.kv_bytes <= 12 * 2**20 < result.stats.kv_bytes_full / 3
    assert llm.pool.bytes_used == 0


@pytest.mark.parametrize("budget", ["12KiB", "48tok", "30%"])
def test_pyramid_gives_lower_layers_more(tiny: LoadedModel, budget: str) -> None:
    llm = LLM(tiny, block_size=4, kv_budget=budget, policy="snapkv+pyramid", prefill_chunk=16)
    seq = llm.new_sequence()
    seq.token_ids = list(range(3, 160))
    logits = seq.prefill(16)
    for _ in range(20):  # chunks and steps with layers holding different numbers of tokens
        logits = seq.step(sample(logits, SamplingParams(), None))
    full = [layer for layer in seq.cache.kv_layers if layer.window is None]
    if len(full) > 1:
        assert full[0].table.num_held > full[-1].table.num_held
    if budget == "12KiB":
        assert llm.pool.bytes_used <= 12 * 1024
    assert seq.cache.nbytes == llm.pool.physical_nbytes()
    seq.release()


def test_pyramid_chunked_prefill_matches_one_layer_at_a_time(llama: LoadedModel) -> None:
    """With layers of different sizes, a chunk's logits equal those of feeding its tokens one by one."""
    llm = LLM(llama, block_size=4, kv_budget="40tok", policy="streamingllm+pyramid")
    ids = list(range(3, 120))
    chunked, single = llm.new_sequence(), llm.new_sequence()
    chunked.token_ids = single.token_ids = ids[:100]
    chunked.prefill(8)
    single.prefill(8)
    assert [layer.table.num_held for layer in chunked.cache.kv_layers] == [
        layer.table.num_held for layer in single.cache.kv_layers
    ]
    chunked.token_ids += [120, 121, 122]
    out = chunked.prefill(3, all_logits=True)  # one forward of 3 tokens
    steps = [single.step(t) for t in (120, 121, 122)]
    torch.testing.assert_close(out, torch.stack(steps), rtol=0, atol=1e-4)
    chunked.release()
    single.release()


def test_cake_measures_layer_shares_once_and_keeps_them(tiny: LoadedModel) -> None:
    llm = LLM(tiny, block_size=4, kv_budget="16KiB", policy="keynorm+cake")
    seq = llm.new_sequence()
    seq.token_ids = list(range(3, 150))
    logits = seq.prefill(512)  # chunks shrink once the measured shares lower a layer's capacity
    weights = seq.cache.layer_weights
    assert weights is not None and abs(sum(weights) / len(weights) - 1) < 1e-6
    for _ in range(30):
        logits = seq.step(sample(logits, SamplingParams(), None))
        assert llm.pool.bytes_used <= 16 * 1024
    assert seq.cache.layer_weights == weights
    seq.release()


@pytest.mark.parametrize(("policy", "low"), [("h2o+mixed", "kivi2"), ("h2o+mixed-rot2+kivi8", "rot2")])
def test_mixed_precision_demotes_instead_of_dropping(tiny: LoadedModel, policy: str, low: str) -> None:
    llm = LLM(tiny, block_size=4, kv_budget="8tok", policy=policy)
    assert llm.policy is not None and llm.policy.name == policy  # the name round-trips
    seq = llm.new_sequence()
    seq.token_ids = list(range(3, 40))
    seq.prefill(4)
    for layer in seq.cache.kv_layers:
        if layer.window is not None:
            continue
        assert isinstance(layer, MixedLayer) and layer.ratio >= 1
        assert layer.low.fmt is not None and layer.low.fmt.name == low
        layer.check()
        assert layer.held <= 8 and layer.nbytes <= layer.cost_of_blocks(8 // 4)  # within its room
        assert layer.held + layer.num_low > 8  # more tokens visible than an eviction would keep
        keys, _ = layer.past().dense()  # low (dequantized), then high: [H, T, D]
        assert keys.shape[1] == layer.held + layer.num_low
        # demoted tokens are stored packed, in whole blocks: no full-precision residual in `low`
        assert layer.num_low % 4 == 0 and all(p is not None for p in layer.low.packed)
        assert layer.attention is not None and layer.attention.shape[1] == keys.shape[1]
    assert seq.cache.nbytes == llm.pool.bytes_used == llm.pool.physical_nbytes()
    seq.release()


def test_mixed_precision_keeps_every_token_while_its_room_holds_them(llama: LoadedModel) -> None:
    """The high share shrinks as the context grows; tokens are dropped only once the room cannot
    hold them all at the low precision."""
    llm = LLM(llama, block_size=4, kv_budget=16 * 1024, policy="snapkv+mixed-rot2+kivi8")
    seq = llm.new_sequence()
    seq.token_ids = list(range(3, 20))
    logits = seq.prefill(8)
    capacity = next(iter(llm.policy.capacities(seq.cache).values()))  # type: ignore[union-attr]
    layers = [layer for layer in seq.cache.kv_layers if isinstance(layer, MixedLayer)]
    highs, dropped_at = [], None
    for _ in range(200):
        logits = seq.step(int(logits.argmax()))
        for layer in layers:
            assert layer.nbytes <= layer.cost_of_blocks(capacity // 4)
        layer = layers[0]
        highs.append(layer.held)
        if dropped_at is None and layer.held + layer.num_low < layer.seq_length:
            dropped_at = layer.seq_length
    assert dropped_at is not None and highs[-1] < max(highs)  # the high share did shrink
    # nothing was dropped while every token fitted at low precision beside one high block
    low_block = layers[0].low.cost_of_blocks(2) - layers[0].low.cost_of_blocks(1)
    room = layers[0].cost_of_blocks(capacity // 4) - layers[0].high.cost_of_blocks(1)
    assert dropped_at > (room // low_block) * 4 * 0.8
    assert llm.pool.bytes_used <= 16 * 1024
    seq.release()
