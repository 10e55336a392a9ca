"""Every scorer's choice is carried out: the tokens a layer keeps are the ones its scores rank highest.

Part one runs each registered scorer through the policy's real eviction (``Policy.evict``) on a
prefilled layer and checks that every kept token scored at least as high as every dropped one
(an eviction that kept the lowest scores, or ignored them, fails). Part two plants inputs where
each method's paper says which tokens must stay, and checks its scores rank them on top.
"""

from __future__ import annotations

import pytest
import torch

from kvmem.compress.budget import KVBudget
from kvmem.compress.policy import Policy
from kvmem.compress.registry import SCORERS
from kvmem.compress.scorer import ScoreInputs, Scorer
from kvmem.compress.scorers.h2o import H2O
from kvmem.compress.scorers.key_norm import KeyNorm
from kvmem.compress.scorers.scissorhands import Scissorhands
from kvmem.compress.scorers.snapkv import SnapKV
from kvmem.compress.scorers.streaming_llm import StreamingLLM
from kvmem.compress.scorers.tova import TOVA
from kvmem.engine.llm import LLM
from kvmem.engine.sequence import Sequence
from kvmem.model.loader import LoadedModel


def _recording(cls: type[Scorer], seen: list[torch.Tensor]) -> Scorer:
    def score(self: Scorer, x: ScoreInputs) -> torch.Tensor:
        scores = cls.score(self, x)
        seen.append(scores)
        return scores

    return type(f"Recording{cls.__name__}", (cls,), {"score": score})()


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_eviction_keeps_the_tokens_its_scorer_ranks_highest(llama: LoadedModel, name: str) -> None:
    seen: list[torch.Tensor] = []
    llm = LLM(llama, block_size=4)
    policy = Policy((_recording(SCORERS[name], seen),), KVBudget.parse("100%"))  # 100%: nothing evicted yet
    seq = Sequence(llm.loaded.model, llm.pool, llm.spec, policy)
    seq.token_ids = list(range(3, 63))
    seq.prefill(16)
    assert not seen
    layer = seq.cache.kv_layers[0]
    before, _ = layer.past().dense()  # [H, T, D]; layer 0's keys identify tokens (token + position)
    keep = 21
    policy.evict(layer, keep)
    (scores,) = seen  # [H, T]
    after, _ = layer.past().dense()  # [H, keep, D]
    assert after.shape[1] == keep
    for h in range(before.shape[0]):
        exact = "donot_use_mm_for_euclid_dist"
        distance = torch.cdist(after[h].float(), before[h].float(), compute_mode=exact)  # [keep, T]
        kept = distance.argmin(dim=-1)
        assert bool((distance.min(dim=-1).values < 1e-6).all())  # every kept row is an original token
        assert kept.unique().numel() == keep and bool((kept[1:] > kept[:-1]).all())  # in order
        dropped = torch.ones(before.shape[1], dtype=torch.bool)
        dropped[kept] = False
        assert float(scores[h, kept].min()) >= float(scores[h, dropped].max()), (name, h)
    seq.release()


def _inputs(
    keys: torch.Tensor, queries: torch.Tensor | None = None, attention=None, keep: int = 8
) -> ScoreInputs:  # type: ignore[no-untyped-def]
    return ScoreInputs(
        keys=keys, values=torch.zeros_like(keys), queries=queries, attention=attention,
        scaling=keys.shape[-1] ** -0.5, keep=keep, layer_idx=0,
    )  # fmt: skip


def _top(scores: torch.Tensor, keep: int) -> set[int]:
    return set(torch.topk(scores[0], keep).indices.tolist())


PLANTED = [3, 11, 17, 25]  # tokens 0..63 of a 64-token layer; the last ones are recent


def test_keynorm_keeps_the_lowest_norm_keys() -> None:
    keys = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(0)) + 3
    keys[:, PLANTED] *= 0.05
    assert _top(KeyNorm().score(_inputs(keys)), 4) == set(PLANTED)


def test_h2o_keeps_heavy_hitters_and_the_recent_window() -> None:
    attention = torch.rand(2, 64, generator=torch.Generator().manual_seed(1))
    attention[:, PLANTED] += 10
    scores = H2O().score(_inputs(torch.zeros(2, 64, 16), attention=attention, keep=8))
    assert _top(scores, 8) == set(PLANTED) | set(range(60, 64))  # half the kept budget is recent


def _aligned(seed: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys, and recent queries that point at the planted keys (GQA: 4 query heads on 2 KV heads)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, 64, 16, generator=g) * 0.1
    direction = torch.randn(16, generator=g)
    keys[:, PLANTED] = direction * 2
    queries = (direction * 2).expand(4, window, 16).clone() + torch.randn(4, window, 16, generator=g) * 0.1
    return keys, queries


def test_snapkv_keeps_what_the_observation_window_attends_to() -> None:
    keys, queries = _aligned(2, 8)
    scorer = SnapKV(window=8, kernel=1)  # no pooling: the votes themselves
    assert _top(scorer.score(_inputs(keys, queries)), 12) == set(PLANTED) | set(range(56, 64))


def test_tova_keeps_what_the_last_query_attends_to() -> None:
    keys, queries = _aligned(3, 1)
    assert _top(TOVA().score(_inputs(keys, queries)), 4) == set(PLANTED)


def test_scissorhands_keeps_tokens_pivotal_for_many_queries() -> None:
    keys, queries = _aligned(4, 16)
    scorer = Scissorhands(history=16, recent=2)
    assert _top(scorer.score(_inputs(keys, queries)), 6) == set(PLANTED) | {62, 63}


def test_streamingllm_keeps_sinks_then_the_newest() -> None:
    scores = StreamingLLM().score(_inputs(torch.zeros(2, 64, 16)))
    assert _top(scores, 10) == set(range(4)) | set(range(58, 64))
