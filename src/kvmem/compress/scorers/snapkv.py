from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvmem.compress.scorer import ScoreInputs, Scorer, protect_last, recent_attention


@dataclass(frozen=True)
class SnapKV(Scorer):
    """SnapKV (Li et al., 2024): the attention of an observation window of the last ``window``
    queries, summed over the window and smoothed by average pooling (``kernel``), picks the
    tokens each head keeps; the window's own tokens always stay. As in the paper the score is
    per KV head (GQA query heads averaged). kvmem also applies it during decoding, with the
    last ``window`` decoded queries as the observation window."""

    name = "snapkv"
    summary = "observation window of recent queries + pooling, per head"
    window: int = 32
    kernel: int = 7

    @property
    def query_window(self) -> int:  # type: ignore[override]
        return self.window

    def score(self, x: ScoreInputs) -> torch.Tensor:
        assert x.queries is not None
        w = x.queries.shape[1]
        votes = recent_attention(x.queries, x.keys, x.scaling, x.valid).sum(dim=1)  # [H, T]
        pooled = F.avg_pool1d(votes.unsqueeze(1), self.kernel, stride=1, padding=self.kernel // 2)
        return protect_last(pooled.squeeze(1)[:, : x.num_tokens], w)
