"""kvmem's attention function, registered with transformers' public ``AttentionInterface``.

Inside a kvmem forward (the call carries ``kvmem_batch``, see ``kvmem.model.batch``) attention is
the batch's: every sequence attends to its own blocks. Anywhere else (transformers' own
``generate`` on the same model, a plain ``KVMemCache``) it is transformers' SDPA attention with
the mask transformers built, so switching a model to kvmem's attention changes nothing there.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

ATTENTION_NAME = "kvmem"

# torch >= 2.5 attends grouped-query heads without copying keys per query head (``enable_gqa``)
_SDPA_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


def sdpa(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Attention of ``query`` [B, Hq, Q, D] over ``keys``/``values`` [B, H, T, D] (Hq a multiple of
    H: grouped-query heads), where ``mask`` [B, 1 or Hq, Q, T] (bool) is True: [B, Hq, Q, D]."""
    groups = query.shape[1] // keys.shape[1]
    if groups > 1 and not _SDPA_GQA:
        keys = keys.repeat_interleave(groups, dim=1)
        values = values.repeat_interleave(groups, dim=1)
    extra = {"enable_gqa": True} if groups > 1 and _SDPA_GQA else {}
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling, **extra)


def kvmem_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    batch = kwargs.pop("kvmem_batch", None)
    if batch is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # query: [1, Hq, N, D]; key, value: [1, H, N, D] (this forward's tokens) -> [1, N, Hq, D]
    return batch.attend(module.layer_idx, query, key, value, scale), None


def register() -> str:
    """Register kvmem's attention (idempotent) and return its name, for ``set_attn_implementation``."""
    AttentionInterface.register(ATTENTION_NAME, kvmem_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME
