"""Layer kinds by name. A kind is one file in this package plus one entry in ``LAYER_KINDS``.

A compression policy describes each layer it wants with a ``LayerSpec`` (a kind, a block format,
the kind's options); the cache builds the layers from those specs. The storage floor never looks
at a policy: it gets what it needs in the spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvmem.kv.pool import KVPool
from kvmem.model.format import Quantizer, TokenFormat
from kvmem.model.layers.base import Kept, KVLayer, LayerParams, UnsupportedLayerError
from kvmem.model.layers.blocks import BlockList
from kvmem.model.layers.listed import ListLayer
from kvmem.model.layers.mixed import MixedLayer
from kvmem.model.layers.offload import BlockStore, OffloadLayer
from kvmem.model.layers.paged import PagedLayer
from kvmem.model.layers.perhead import PerHeadLayer
from kvmem.model.layers.sliding import SlidingLayer

LAYER_KINDS: dict[str, type[KVLayer]] = {
    cls.kind: cls for cls in (PagedLayer, SlidingLayer, PerHeadLayer, MixedLayer, OffloadLayer)
}
NEEDS_STORE = frozenset({OffloadLayer.kind})  # kinds that are handed a BlockStore


@dataclass(frozen=True)
class LayerSpec:
    """One layer as a policy wants it: ``kind`` (a key of ``LAYER_KINDS``), a block format for
    its full blocks (None: full precision), keyword options of that kind (hashable pairs), and
    a format for the block being filled (``residual``; None: the model's dtype)."""

    kind: str = PagedLayer.kind
    fmt: Quantizer | None = None
    options: tuple[tuple[str, Any], ...] = ()
    residual: TokenFormat | None = None

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"unknown layer kind {self.kind!r}; known: {', '.join(LAYER_KINDS)}")
        if self.residual is not None and self.fmt is None:
            raise ValueError("a residual format needs a block format for the full blocks")

    @property
    def needs_store(self) -> bool:
        return self.kind in NEEDS_STORE


def default_spec(
    window: int | None, fmt: Quantizer | None = None, residual: TokenFormat | None = None
) -> LayerSpec:
    """A full-attention layer is paged, a sliding-window one is sliding; both in ``fmt``."""
    return LayerSpec(SlidingLayer.kind if window is not None else PagedLayer.kind, fmt, residual=residual)


def build_layer(
    spec: LayerSpec,
    pool: KVPool,
    num_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    layer_idx: int,
    window: int | None,
    device: torch.device,
    store: BlockStore | None = None,
) -> KVLayer:
    options: dict[str, Any] = dict(spec.options)
    if spec.needs_store:
        if store is None:
            raise ValueError(f"a {spec.kind} layer needs a block store")
        options["store"] = store
    params = LayerParams(pool, num_heads, head_dim, dtype, layer_idx, window, device, spec.fmt, spec.residual)
    return LAYER_KINDS[spec.kind](params, **options)


__all__ = [
    "LAYER_KINDS",
    "BlockList",
    "BlockStore",
    "KVLayer",
    "Kept",
    "LayerParams",
    "LayerSpec",
    "ListLayer",
    "MixedLayer",
    "OffloadLayer",
    "PagedLayer",
    "PerHeadLayer",
    "SlidingLayer",
    "UnsupportedLayerError",
    "build_layer",
    "default_spec",
]
