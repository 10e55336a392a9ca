from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmem.compress.scorer import ScoreInputs, Scorer


@dataclass(frozen=True)
class RandomScorer(Scorer):
    """A baseline: keep a random subset (seeded by the layer and the number of tokens, so runs repeat)."""

    name = "random"
    summary = "a random subset of tokens (baseline)"
    seed: int = 0

    def score(self, x: ScoreInputs) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + x.layer_idx * 10_007 + x.num_tokens)
        return torch.rand((x.keys.shape[0], x.num_tokens), generator=generator).to(x.keys.device)
