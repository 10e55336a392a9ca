"""Mixed precision: tokens an eviction would drop are kept at low precision instead."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from kvmem.compress.kivi import KIVI


@dataclass(frozen=True)
class MixedPrecision:
    """ "No Token Left Behind" (MiKV, Yang et al., 2024): the tokens an eviction scorer ranks
    lowest are not dropped but demoted to a low-precision store (KIVI 2-bit by default), so
    attention still sees an approximation of them; the important ones stay at full (or the
    policy's quantizer's) precision.

    ``low_share`` of each layer's byte budget goes to the low-precision store. Simplified from
    the paper: demoted tokens are never promoted back, and when the low store is full its
    oldest blocks are dropped (MiKV keeps every token and has no byte cap); the paper's
    outlier-aware key balancing is left to KIVI's per-channel key quantization.
    """

    name: ClassVar[str] = "mixed"
    summary: ClassVar[str] = "MiKV: tokens ranked low are kept at 2 bits instead of evicted"
    low: KIVI = field(default_factory=lambda: KIVI(2))
    low_share: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.low_share < 1:
            raise ValueError(f"low_share must be within (0, 1), got {self.low_share}")
