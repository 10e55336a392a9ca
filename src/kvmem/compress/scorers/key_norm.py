from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmem.compress.scorer import ScoreInputs, Scorer


@dataclass(frozen=True)
class KeyNorm(Scorer):
    """Key-norm eviction (Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy"):
    keys with a low L2 norm tend to receive high attention, so the lowest-norm keys are kept."""

    name = "keynorm"
    summary = "keep the keys with the lowest L2 norm (no attention needed)"

    def score(self, x: ScoreInputs) -> torch.Tensor:
        return -x.keys.float().norm(dim=-1)  # [H, T]
