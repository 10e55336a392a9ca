"""Block formats as policy parts: a word that names a format fills one of three slots.

``kivi4`` (``Quant``) is the format of every layer's full blocks, ``sliding-rot2`` (``Sliding``)
that of the sliding-window layers only, ``res8`` (``Residual``) that of the block being filled.
The formats themselves are ``kvmem.compress.formats``'; these parts say where a policy puts them.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmem.compress.bits import describe_bits
from kvmem.compress.formats import QUANTIZERS, RESIDUALS, find_quantizer, prefixed_format
from kvmem.compress.part import Part
from kvmem.compress.residual import parse_residual
from kvmem.model.format import Quantizer, TokenFormat

SLIDING = "sliding"  # ``sliding-<format>``: the block format of sliding-window layers


@dataclass(frozen=True)
class Quant(Part):
    fmt: Quantizer
    slot = "quant"

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.fmt.name

    @classmethod
    def parse(cls, word: str) -> Quant | None:
        fmt = find_quantizer(word)
        return None if fmt is None else cls(fmt)

    @classmethod
    def rows(cls) -> list[tuple[str, str]]:
        return [(name, f"{q.summary} ({describe_bits(q)})") for name, q in QUANTIZERS.items()]


@dataclass(frozen=True)
class Sliding(Part):
    """The block format of sliding-window layers, where it differs from the policy's quantizer's."""

    fmt: Quantizer
    slot = "sliding"

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{SLIDING}-{self.fmt.name}"

    @classmethod
    def parse(cls, word: str) -> Sliding | None:
        fmt = prefixed_format(word, SLIDING, "sliding-rotk3v2, sliding-kivi2, …")
        return None if fmt is None else cls(fmt)

    @classmethod
    def rows(cls) -> list[tuple[str, str]]:
        return [
            (
                f"{SLIDING}-<format>",
                "the sliding-window layers' blocks at <format> (the full-attention layers at the policy's "
                "quantizer, or full precision): precision by layer",
            )
        ]


@dataclass(frozen=True)
class Residual(Part):
    fmt: TokenFormat
    slot = "residual"
    needs = ("quant", "sliding")

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.fmt.name

    @classmethod
    def parse(cls, word: str) -> Residual | None:
        fmt = parse_residual(word)
        return None if fmt is None else cls(fmt)

    @classmethod
    def rows(cls) -> list[tuple[str, str]]:
        return [(name, f"{r.summary} ({describe_bits(r)})") for name, r in RESIDUALS.items()]

    def unmet(self) -> str:
        return (
            f"{self.name} holds the block being filled at low bits beside a block format; add one "
            "(rotk4v2+res8, kivi4+res8, …)"
        )
