from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmem.compress.scorer import ScoreInputs, Scorer, protect_last, recent_attention


@dataclass(frozen=True)
class Scissorhands(Scorer):
    """Scissorhands (Liu et al., 2023): "persistence of importance" — a token that was pivotal
    (received more than the average attention) for many of the last ``history`` queries will
    likely stay pivotal. Score = how many recent queries found the token pivotal (attention sum as
    a tie-break); the last ``recent`` tokens always stay. Simplified: the paper counts over the
    attention of past steps as they happened; kvmem recomputes those queries' attention over the
    tokens held now (the same where nothing was evicted since)."""

    name = "scissorhands"
    summary = "persistence of importance: pivotal for many recent queries"
    history: int = 32
    recent: int = 8

    @property
    def query_window(self) -> int:  # type: ignore[override]
        return self.history

    def score(self, x: ScoreInputs) -> torch.Tensor:
        assert x.queries is not None
        attention = recent_attention(x.queries, x.keys, x.scaling, x.valid)  # [H, w, T]
        visible = (attention > 0).sum(dim=-1, keepdim=True).clamp(min=1)  # tokens each query sees
        pivotal = (attention > 1.0 / visible).sum(dim=1).float()  # [H, T]
        return protect_last(pivotal + attention.sum(dim=1) / (attention.shape[1] + 1), self.recent)
