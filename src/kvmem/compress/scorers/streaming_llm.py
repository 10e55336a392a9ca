from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmem.compress.scorer import ScoreInputs, Scorer


@dataclass(frozen=True)
class StreamingLLM(Scorer):
    """StreamingLLM (Xiao et al., 2023): keep the first ``sinks`` tokens (attention sinks) and the
    most recent ones; drop the middle. Positions stay the true positions (RoPE applied before
    storage) rather than being re-assigned inside the cache as in the paper's rolling cache."""

    name = "streamingllm"
    summary = "attention sinks (first tokens) + the most recent window"
    per_head = False  # scores are slot positions, the same for every head
    sinks: int = 4

    def score(self, x: ScoreInputs) -> torch.Tensor:
        order = (
            torch.arange(x.num_tokens, dtype=torch.float32, device=x.keys.device)
            .expand(x.keys.shape[0], -1)
            .clone()
        )
        order[:, : self.sinks] = float("inf")
        return order  # newer slots score higher
