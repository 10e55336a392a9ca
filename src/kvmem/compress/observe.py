"""What eviction scorers learn from attention: each layer's recent queries and the attention each
held token has received (H2O's accumulated attention).

An ``Observer`` is handed to the batched forward (``kvmem.model.batch.Row``); kvmem's attention
shows it, for every layer, the new queries and the keys they attended to. It writes what it
learns on the sequence's layers (``recent_queries``, ``attention``, ``scaling``), where the
policy's scorers read it and the snapshot code saves it.
"""

from __future__ import annotations

import torch

from kvmem.model.cache import KVMemCache


class Observer:
    """Keeps, per full-attention layer, the last ``query_window`` queries and (``accumulate``) the
    attention each held token has received since it arrived."""

    def __init__(self, cache: KVMemCache, query_window: int, accumulate: bool) -> None:
        self.cache = cache
        self.query_window = query_window
        self.accumulate = accumulate
        self.needs_keys = accumulate  # only the accumulated attention reads the keys

    def observe(
        self,
        layer_idx: int,
        query: torch.Tensor,
        keys: torch.Tensor | None,
        scaling: float,
        valid: torch.Tensor | None,
    ) -> None:
        # query: [1, Hq, q, D]; keys: [1, H, T, D] (held then new); valid: [H, T] or None
        layer = self.cache.kv_layers[layer_idx]
        if layer.window is not None:  # sliding layers are bounded by their window already
            return
        layer.scaling = scaling
        q = query[0].detach()
        if self.query_window:
            old = layer.recent_queries
            joined = q if old is None else torch.cat([old, q], dim=1)
            layer.recent_queries = joined[:, -self.query_window :]
        if self.accumulate:
            assert keys is not None
            layer.attention = _accumulate(layer.attention, q, keys[0], scaling, valid)


def _accumulate(
    old: torch.Tensor | None,
    q: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Add the attention of the new queries (causal among themselves) to each token's total: [H, T].

    Padding slots (``valid`` False) receive none."""
    heads, t = keys.shape[0], keys.shape[1]
    n = q.shape[1]
    groups = q.shape[0] // heads
    logits = (q.reshape(heads, groups * n, -1) @ keys.transpose(1, 2)).float() * scaling
    logits = logits.reshape(heads, groups, n, t)
    device = keys.device
    later = torch.arange(t, device=device).view(1, t) > (t - n + torch.arange(n, device=device)).view(n, 1)
    logits = logits.masked_fill(later, float("-inf"))
    if valid is not None:
        logits = logits.masked_fill(~valid.view(heads, 1, 1, t), float("-inf"))
    received = torch.softmax(logits, dim=-1).sum(dim=2).mean(dim=1)
    if old is not None:
        received[:, : old.shape[1]] += old
    return received
