"""How a budget is shared among full-attention layers: relative weights with mean 1."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvmem.compress.part import Part
from kvmem.compress.scorer import recent_attention
from kvmem.model.layers import KVLayer


class Allocator(Part, ABC):
    """Gives each full-attention layer (bottom to top) a share of the budget. Reads the layers;
    changes nothing. ``query_window > 0`` asks the engine to remember recent queries per layer."""

    name: ClassVar[str]
    summary: ClassVar[str]
    query_window: ClassVar[int] = 0
    slot = "allocator"
    needs = ("scorer",)

    @abstractmethod
    def weights(self, layers: Sequence[KVLayer]) -> list[float] | None:
        """Relative budgets, one per layer, averaging 1; None when not yet known (then uniform)."""


@dataclass(frozen=True)
class Uniform(Allocator):
    name = "uniform"
    summary = "every layer the same budget (the default)"
    implied = True

    @classmethod
    def rows(cls) -> list[tuple[str, str]]:
        return []  # the default: not listed

    def weights(self, layers: Sequence[KVLayer]) -> list[float]:
        return [1.0] * len(layers)


@dataclass(frozen=True)
class Pyramid(Allocator):
    """PyramidKV (Cai et al., 2024): lower layers attend broadly and get more cache, upper layers
    attend to few tokens and get less. Budgets fall arithmetically from ``1 + spread`` times the
    mean at the bottom layer to ``1 - spread`` at the top (the paper sets the top budget through
    a ratio ``beta``; ``spread`` plays that role)."""

    name = "pyramid"
    summary = "PyramidKV: budgets falling linearly from lower to upper layers"
    spread: float = 0.5

    def weights(self, layers: Sequence[KVLayer]) -> list[float]:
        n = len(layers)
        if n == 1:
            return [1.0]
        return [1 + self.spread * (1 - 2 * i / (n - 1)) for i in range(n)]


@dataclass(frozen=True)
class CAKE(Allocator):
    """CAKE (Qin et al., 2025): a layer's preference is its attention's spatial dispersion (entropy
    of the window's mean attention over tokens) times its temporal shift (variance of attention
    across the window's queries), each to the power 1/tau; budgets are proportional. Measured once
    per sequence, from the recent queries when the first eviction is due, and kept. Simplified: the
    paper's cascading re-allocation during prefill is replaced by this single measurement, and
    preferences are clamped to [min_share, 1/min_share] times the mean."""

    name = "cake"
    summary = "CAKE: budgets by each layer's attention dispersion and shift"
    query_window = 32
    tau_dispersion: float = 1.0
    tau_shift: float = 1.0
    min_share: float = 0.2

    def weights(self, layers: Sequence[KVLayer]) -> list[float] | None:
        preferences = []
        for layer in layers:
            if layer.recent_queries is None:
                return None
            keys, _, _, valid = layer.scoring()
            scaling = layer.head_dim**-0.5 if layer.scaling is None else layer.scaling
            attention = recent_attention(layer.recent_queries, keys, scaling, valid)  # [H, w, T]
            mean = attention.mean(dim=1)  # [H, T]
            dispersion = float(-(mean * torch.log(mean.clamp_min(1e-12))).sum(-1).mean())
            shift = (
                float(attention.var(dim=1, unbiased=False).sum(-1).mean()) if attention.shape[1] > 1 else 1.0
            )
            preferences.append(
                max(dispersion, 1e-6) ** (1 / self.tau_dispersion) * max(shift, 1e-9) ** (1 / self.tau_shift)
            )
        mean_pref = sum(preferences) / len(preferences)
        raw = [p / mean_pref for p in preferences]
        clamped = [min(max(w, self.min_share), 1 / self.min_share) for w in raw]
        total = sum(clamped)
        return [w * len(clamped) / total for w in clamped]


ALLOCATORS: dict[str, Allocator] = {a.name: a for a in (Uniform(), Pyramid(), CAKE())}
