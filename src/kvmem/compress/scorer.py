"""The scorer contract: which held tokens matter most, per KV head. Higher scores are kept."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvmem.compress.part import Part


@dataclass(frozen=True)
class ScoreInputs:
    """What a scorer may look at for one layer. Slots are in position order within each head."""

    keys: torch.Tensor  # [H, T, D] held keys (RoPE applied)
    values: torch.Tensor  # [H, T, D]
    queries: torch.Tensor | None  # [Hq, w, D] the most recent queries, if the scorer asked for them
    attention: torch.Tensor | None  # [H, T] attention accumulated since each token arrived
    scaling: float
    keep: int  # how many slots per head will be kept
    layer_idx: int
    valid: torch.Tensor | None = None  # [H, T] bool: False marks padding (heads of unequal length)

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[1]


class Scorer(Part, ABC):
    """Scores the held tokens of one layer. Does not modify the cache; always safe to call.

    ``query_window > 0`` asks the engine to remember that many recent queries per layer;
    ``accumulates`` asks it to add up, for every held token, the attention it receives.
    ``per_head`` says each head's scores depend on that head's tokens only, which head-adaptive
    budgets (AdaKV), where heads hold different tokens, need.

    As a policy part it fills the ``scorer`` slot and evicts: blocks made under it are no prefix's.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    slot = "scorer"
    evicts = bounds = True
    shares_prefix = False
    query_window: ClassVar[int] = 0
    accumulates: ClassVar[bool] = False
    per_head: ClassVar[bool] = True

    @abstractmethod
    def score(self, x: ScoreInputs) -> torch.Tensor:
        """Scores [H, T]; the ``keep`` highest of each head stay. ``inf`` forces a token to stay."""


def recent_attention(
    queries: torch.Tensor, keys: torch.Tensor, scaling: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention of the recent queries over the held keys, per KV head: [H, w, T].

    Query ``i`` of ``w`` sits at the position of key ``T - w + i`` and sees no later key. Query
    heads of a GQA group are averaged onto their KV head. Slots where ``valid`` ([H, T]) is False
    (padding) get no attention.
    """
    heads, w, t = keys.shape[0], queries.shape[1], keys.shape[1]
    groups = queries.shape[0] // heads
    q = queries.reshape(heads, groups * w, -1)  # [H, G*w, D]
    logits = (q @ keys.transpose(1, 2)).float() * scaling  # [H, G*w, T]
    logits = logits.reshape(heads, groups, w, t)
    device = keys.device
    later = torch.arange(t, device=device).view(1, t) > (t - w + torch.arange(w, device=device)).view(
        w, 1
    )  # [w, T]
    logits = logits.masked_fill(later, float("-inf"))
    if valid is not None:
        logits = logits.masked_fill(~valid.view(heads, 1, 1, t), float("-inf"))
    return torch.softmax(logits, dim=-1).mean(dim=1)  # [H, w, T]


def protect_last(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Force the last ``n`` slots of every head to stay."""
    if n > 0:
        scores = scores.clone()
        scores[:, -n:] = float("inf")
    return scores
