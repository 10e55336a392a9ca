"""Budgets across the KV heads of a layer: AdaKV's head-adaptive selection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from kvmem.compress.part import Part, UnknownPolicyError
from kvmem.model.format import Quantizer, TokenFormat
from kvmem.model.layers import LayerSpec

if TYPE_CHECKING:
    from kvmem.compress.policy import Policy


@dataclass(frozen=True)
class AdaKV(Part):
    """AdaKV (Feng et al., 2024): a layer's budget of ``keep * H`` slots goes to the best-scored
    tokens of the whole layer, not ``keep`` per head, so heads whose attention is concentrated
    give room to heads whose attention is spread. As in the paper, each head is first guaranteed
    ``floor * keep`` of its own best tokens (the "safeguard"), then the rest is chosen across heads.

    Scores must be comparable across heads (attention-based scores are). The saving is real:
    the cache stores each head in its own blocks (``RaggedLayer``), so a head keeping fewer
    tokens holds fewer blocks.
    """

    name: ClassVar[str] = "adakv"
    summary: ClassVar[str] = "AdaKV: a layer's budget shared unevenly among its heads (per-head storage)"
    slot = "heads"
    shares_prefix = False
    needs = ("scorer",)
    excludes = ("merge",)
    floor: float = 0.2

    def __post_init__(self) -> None:
        if not 0 <= self.floor <= 1:
            raise ValueError(f"AdaKV floor must be within [0, 1], got {self.floor}")

    def check(self, policy: Policy) -> None:
        scorer = policy.scorer
        if scorer is not None and not scorer.per_head:
            raise UnknownPolicyError(f"adakv needs scores per head; {scorer.name} scores every head alike")

    def layer_spec(self, fmt: Quantizer | None, residual: TokenFormat | None) -> LayerSpec:
        return LayerSpec("perhead", fmt, residual=residual)

    def select(self, scores: torch.Tensor, valid: torch.Tensor | None, keep: int) -> torch.Tensor:
        """Which slots stay: bool [H, T] with ``min(keep * H, valid slots)`` True, never on padding.

        scores: [H, T] (higher kept, ``inf`` forces a slot to stay); valid: [H, T] bool or None.
        """
        heads, t = scores.shape
        if valid is None:
            valid = torch.ones((heads, t), dtype=torch.bool, device=scores.device)
        scores = scores.float().masked_fill(~valid, float("-inf"))
        chosen = torch.zeros((heads, t), dtype=torch.bool, device=scores.device)
        guaranteed = min(max(1, int(self.floor * keep)), t)
        chosen.scatter_(1, scores.topk(guaranteed, dim=-1).indices, True)
        chosen &= valid
        rest = min(keep * heads, int(valid.sum())) - int(chosen.sum())
        if rest > 0:
            # every open slot ranks above padding and chosen slots; `rest` is at most the open slots
            open_slots = (valid & ~chosen).flatten()
            remaining = torch.where(open_slots, scores.flatten().clamp_min(-3e38), float("-inf"))
            chosen.view(-1)[remaining.topk(rest).indices] = True
        return chosen
