"""Mixed precision: tokens an eviction would drop are kept at low precision instead."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from kvmem.compress.formats import prefixed_format
from kvmem.compress.kivi import KIVI
from kvmem.compress.part import Part
from kvmem.errors import InvalidBudgetError
from kvmem.model.format import Quantizer, TokenFormat
from kvmem.model.layers import LayerSpec

if TYPE_CHECKING:
    from kvmem.compress.policy import Policy

NAME = "mixed"


@dataclass(frozen=True)
class MixedPrecision(Part):
    """ "No Token Left Behind" (MiKV, Yang et al., 2024): the tokens an eviction scorer ranks
    lowest are not dropped but demoted to a low-precision store (KIVI 2-bit by default), so
    attention still sees an approximation of them; the important ones stay at full (or the
    policy's quantizer's) precision.

    ``low_share`` of each layer's byte budget goes to the low-precision store at first (the static
    split that sets each layer's room); within that room every token is kept while it fits: as
    the context grows the high share shrinks (the lowest-ranked tokens demoted, in whole blocks),
    and only once the room cannot hold every token at the low precision are the oldest low blocks
    dropped. ``mixed-<format>``
    names another low format (``mixed-rot2``: rotated 2-bit codes), so that with the policy's
    quantizer for the kept tokens (``snapkv+mixed-rot2+kivi8``) precision follows importance
    in three levels: the scorer's top tokens (and the recent window, which scorers keep) at the
    policy's format, the rest at the low one, the oldest of those dropped. Simplified from
    the paper: demoted tokens are never promoted back, and when the room cannot hold every token
    at the low precision the oldest low blocks are dropped (MiKV keeps every token and has no byte
    cap); the paper's
    outlier-aware key balancing is left to KIVI's per-channel key quantization.
    """

    summary: ClassVar[str] = (
        "MiKV: tokens ranked low are kept at 2 bits instead of evicted (mixed-<format>: at that format)"
    )
    slot = "mixed"
    shares_prefix = False
    needs = ("scorer",)
    excludes = ("heads", "merge")
    low: Quantizer = field(default_factory=lambda: KIVI(2))
    low_share: float = 0.5

    @property
    def name(self) -> str:  # type: ignore[override]  # named by its low format
        return NAME if self.low == KIVI(2) else f"{NAME}-{self.low.name}"

    def __post_init__(self) -> None:
        if not 0 < self.low_share < 1:
            raise ValueError(f"low_share must be within (0, 1), got {self.low_share}")

    @classmethod
    def parse(cls, word: str) -> MixedPrecision | None:
        if word == NAME:
            return cls()
        low = prefixed_format(word, NAME, "mixed-kivi2, mixed-rot2, …")
        return None if low is None else cls(low)

    @classmethod
    def rows(cls) -> list[tuple[str, str]]:
        return [(NAME, cls.summary)]

    def check(self, policy: Policy) -> None:
        if policy.budget.bytes is None and policy.budget.tokens is None:
            raise InvalidBudgetError(
                "mixed precision needs a KV budget in bytes or tokens (a % budget counts tokens, "
                "and mixed precision keeps them all at one precision or another)"
            )

    def layer_spec(self, fmt: Quantizer | None, residual: TokenFormat | None) -> LayerSpec:
        return LayerSpec("mixed", fmt, (("low", self.low), ("low_share", self.low_share)), residual)
