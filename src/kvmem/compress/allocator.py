"""How a budget is shared among full-attention layers: relative weights with mean 1."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar


class Allocator(ABC):
    """Gives each of ``n`` full-attention layers (bottom to top) a share of the budget."""

    name: ClassVar[str]
    summary: ClassVar[str]

    @abstractmethod
    def weights(self, n: int) -> list[float]:
        """Relative budgets, one per layer, averaging 1."""


@dataclass(frozen=True)
class Uniform(Allocator):
    name = "uniform"
    summary = "every layer the same budget (the default)"

    def weights(self, n: int) -> list[float]:
        return [1.0] * n


@dataclass(frozen=True)
class Pyramid(Allocator):
    """PyramidKV (Cai et al., 2024): lower layers attend broadly and get more cache, upper layers
    attend to few tokens and get less. Budgets fall arithmetically from ``1 + spread`` times the
    mean at the bottom layer to ``1 - spread`` at the top (the paper sets the top budget through
    a ratio ``beta``; ``spread`` plays that role)."""

    name = "pyramid"
    summary = "PyramidKV: budgets falling linearly from lower to upper layers"
    spread: float = 0.5

    def weights(self, n: int) -> list[float]:
        if n == 1:
            return [1.0]
        return [1 + self.spread * (1 - 2 * i / (n - 1)) for i in range(n)]


ALLOCATORS: dict[str, Allocator] = {a.name: a for a in (Uniform(), Pyramid())}
