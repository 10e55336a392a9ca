"""Attention for compressed caches, through transformers' public ``AttentionInterface``.

``kvmem_sdpa`` is transformers' SDPA attention plus one thing: when the forward call carries a
``kvmem_observer`` keyword (transformers passes model keywords down to the attention function),
the observer sees each layer's queries and keys; an offloading layer adds the blocks it fetched
for those queries; a full-attention layer holding fewer tokens
than the mask was built for (per-layer budgets) gets a mask of its own size; and a layer whose
heads hold different numbers of tokens (AdaKV) gets a per-head mask hiding its padding.
Otherwise it is plain SDPA.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

ATTENTION_NAME = "kvmem_sdpa"


class Observer:
    """Keeps, per layer, the recent queries and the attention each held token has received."""

    def __init__(self, cache: Any, query_window: int, accumulate: bool) -> None:
        self.cache = cache
        self.query_window = query_window
        self.accumulate = accumulate

    def observe(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        # query: [1, Hq, q, D]; key: [1, H, T, D] (held + new, as attention sees them)
        layer = self.cache.layers[layer_idx]
        if layer.window is not None:  # sliding layers are bounded by their window already
            return
        layer.scaling = scaling
        q = query[0].detach()
        if self.query_window:
            old = layer.recent_queries
            joined = q if old is None else torch.cat([old, q], dim=1)
            layer.recent_queries = joined[:, -self.query_window :]
        if self.accumulate:
            layer.attention = _accumulate(layer.attention, q, key[0], scaling, layer.valid())

    def retrieve(self, layer_idx: int, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys and values a layer fetches for these queries besides those it holds (offloading)."""
        retrieve = getattr(self.cache.layers[layer_idx], "retrieve", None)
        return None if retrieve is None else retrieve(query)

    def valid(self, layer_idx: int) -> torch.Tensor | None:
        """[H, T] bool, False on a layer's padding slots; None when it has none."""
        return self.cache.layers[layer_idx].valid()


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
    later = torch.arange(t).view(1, t) > (t - n + torch.arange(n)).view(n, 1)  # [n, T]
    logits = logits.masked_fill(later, float("-inf"))
    if valid is not None:
        logits = logits.masked_fill(~valid.view(heads, 1, 1, t), float("-inf"))
    received = torch.softmax(logits, dim=-1).sum(dim=2).mean(dim=1)
    if old is not None:
        received[:, : old.shape[1]] += old
    return received


def kvmem_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    observer = kwargs.pop("kvmem_observer", None)
    fetched = None if observer is None else observer.retrieve(module.layer_idx, query)
    if fetched is not None:  # offloaded blocks chosen for these queries: all in their past
        key = torch.cat([fetched[0], key], dim=2)  # [1, H, k + T, D]
        value = torch.cat([fetched[1], value], dim=2)
    q_len, kv_len = query.shape[2], key.shape[2]
    valid = None if observer is None else observer.valid(module.layer_idx)  # [H, T]
    if (
        valid is not None
        or fetched is not None
        or (attention_mask is not None and attention_mask.shape[-1] != kv_len)
    ):
        # transformers builds one mask per layer type, sized for the first layer of that type;
        # with per-layer budgets another full layer may hold fewer tokens. Its held tokens are
        # all in the past of the new ones, so: every held key visible, causal among the new.
        visible = torch.arange(kv_len).view(1, kv_len) <= (kv_len - q_len + torch.arange(q_len)).view(
            q_len, 1
        )
        attention_mask = visible.view(1, 1, q_len, kv_len)
        if valid is not None:  # per head; query heads of a GQA group share their KV head's mask
            groups = query.shape[1] // key.shape[1]
            per_head = valid.repeat_interleave(groups, dim=0)  # [Hq, T]
            attention_mask = attention_mask & per_head.view(1, -1, 1, kv_len)
    if observer is not None:
        head_dim = query.shape[-1]
        observer.observe(module.layer_idx, query, key, scaling if scaling is not None else head_dim**-0.5)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def register() -> str:
    """Register ``kvmem_sdpa`` (idempotent) and return its name."""
    AttentionInterface.register(ATTENTION_NAME, kvmem_sdpa)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME
