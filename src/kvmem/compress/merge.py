"""Merging evicted tokens into kept ones instead of discarding them (D2O / KV-merging style)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmem.compress.part import Part


@dataclass(frozen=True)
class Merge(Part):
    """Each evicted token joins the kept token of the same head whose key is most similar (cosine),
    if the similarity reaches ``threshold``: the kept key and value become the similarity-weighted
    average of the kept token and the tokens merged into it. Simplified from D2O (Wan et al., 2024),
    which sets the threshold by an exponential moving average and weights by exp-similarity."""

    name = "merge"
    summary = "merge evicted tokens into their most similar kept token (D2O-style)"
    slot = "merge"
    shares_prefix = False
    needs = ("scorer",)
    threshold: float = 0.5

    def apply(
        self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values: [H, T, D]; keep: [H, k] -> merged kept keys and values [H, k, D]."""
        heads, t, d = keys.shape
        evicted_mask = torch.ones(heads, t, dtype=torch.bool, device=keys.device)
        evicted_mask.scatter_(1, keep, False)
        dv = values.shape[-1]
        kept_k = keys.gather(1, keep.unsqueeze(-1).expand(-1, -1, d)).float()
        kept_v = values.gather(1, keep.unsqueeze(-1).expand(-1, -1, dv)).float()
        if not bool(evicted_mask.any()):
            return kept_k.to(keys.dtype), kept_v.to(values.dtype)
        unit_kept = torch.nn.functional.normalize(kept_k, dim=-1)  # [H, k, D]
        unit_all = torch.nn.functional.normalize(keys.float(), dim=-1)  # [H, T, D]
        similarity = unit_all @ unit_kept.transpose(1, 2)  # [H, T, k]
        best, target = similarity.max(dim=-1)  # [H, T]
        weight = torch.where(evicted_mask & (best >= self.threshold), best, torch.zeros_like(best))  # [H, T]
        total = torch.ones(heads, keep.shape[1], device=keys.device).scatter_add(1, target, weight)  # [H, k]
        sum_k = kept_k.scatter_add(
            1, target.unsqueeze(-1).expand(-1, -1, d), weight.unsqueeze(-1) * keys.float()
        )
        sum_v = kept_v.scatter_add(
            1, target.unsqueeze(-1).expand(-1, -1, dv), weight.unsqueeze(-1) * values.float()
        )
        return (sum_k / total.unsqueeze(-1)).to(keys.dtype), (sum_v / total.unsqueeze(-1)).to(values.dtype)
