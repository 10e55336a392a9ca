from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmem.compress.scorer import ScoreInputs, Scorer, protect_last


@dataclass(frozen=True)
class H2O(Scorer):
    """H2O (Zhang et al., 2023): heavy hitters — the tokens with the largest attention accumulated
    over every query since they arrived — plus a window of the most recent tokens
    (``recent_share`` of the kept budget). Scores are per KV head (GQA query heads averaged)."""

    name = "h2o"
    summary = "heavy hitters by accumulated attention + recent window"
    accumulates = True
    recent_share: float = 0.5

    def score(self, x: ScoreInputs) -> torch.Tensor:
        assert x.attention is not None
        return protect_last(x.attention, int(x.keep * self.recent_share))
