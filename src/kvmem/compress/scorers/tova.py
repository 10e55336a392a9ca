from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmem.compress.scorer import ScoreInputs, Scorer, recent_attention


@dataclass(frozen=True)
class TOVA(Scorer):
    """TOVA (Oren et al., 2024): keep the tokens the current (last) query attends to most, with
    scores averaged over heads so a layer keeps one set of tokens. Simplified: the paper drops one
    token per step; kvmem drops several at once (a block's worth) to amortise compaction."""

    name = "tova"
    summary = "attention of the last query, averaged over heads"
    per_head = False  # one score for all heads
    query_window = 1

    def score(self, x: ScoreInputs) -> torch.Tensor:
        assert x.queries is not None
        attention = recent_attention(x.queries[:, -1:], x.keys, x.scaling)[:, -1]  # [H, T]
        return attention.mean(dim=0, keepdim=True).expand(x.keys.shape[0], -1)
