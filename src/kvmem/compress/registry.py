"""Every compression method by name: the CLI, the benchmark and the tests find them here.

``PARTS`` lists each kind of policy part once, in the order their names join (``snapkv+kivi4``):
a new part is its own file plus one line here. Block formats are ``kvmem.compress.formats``'.
"""

from __future__ import annotations

from kvmem.compress.allocator import ALLOCATORS, CAKE, Pyramid, Uniform
from kvmem.compress.budget import KVBudget
from kvmem.compress.format_parts import Quant, Residual, Sliding
from kvmem.compress.formats import QUANTIZERS, RESIDUALS, find_quantizer
from kvmem.compress.heads import AdaKV
from kvmem.compress.merge import Merge
from kvmem.compress.mixed import MixedPrecision
from kvmem.compress.offload import Offload
from kvmem.compress.part import Part, UnknownPolicyError
from kvmem.compress.policy import Policy
from kvmem.compress.scorer import Scorer
from kvmem.compress.scorers.h2o import H2O
from kvmem.compress.scorers.key_norm import KeyNorm
from kvmem.compress.scorers.random import RandomScorer
from kvmem.compress.scorers.scissorhands import Scissorhands
from kvmem.compress.scorers.snapkv import SnapKV
from kvmem.compress.scorers.streaming_llm import StreamingLLM
from kvmem.compress.scorers.tova import TOVA

__all__ = [
    "ALLOCATORS",
    "PARTS",
    "QUANTIZERS",
    "RESIDUALS",
    "SCORERS",
    "UnknownPolicyError",
    "find_quantizer",
]

SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls for cls in (StreamingLLM, H2O, Scissorhands, SnapKV, TOVA, KeyNorm, RandomScorer)
}

PARTS: tuple[type[Part], ...] = (
    *SCORERS.values(),
    Uniform,
    Pyramid,
    CAKE,
    AdaKV,
    MixedPrecision,
    Merge,
    Quant,
    Sliding,
    Residual,
    Offload,
)


def _unknown(word: str) -> UnknownPolicyError:
    known = ", ".join(name for kind in PARTS for name, _ in kind.rows())
    return UnknownPolicyError(
        f"unknown policy {word!r}; known policies: {known}, or one of each joined by '+' "
        "(see `kvmem policies`)"
    )


def make_scorer(name: str) -> Scorer:
    try:
        return SCORERS[name.strip().lower()]()
    except KeyError:
        raise _unknown(name) from None


def parse_part(word: str, parts: tuple[type[Part], ...] = PARTS) -> tuple[int, Part]:
    """The part ``word`` names and its kind's place in ``parts``; raises ``UnknownPolicyError``."""
    for rank, kind in enumerate(parts):
        part = kind.parse(word)
        if part is not None:
            return rank, part
    raise _unknown(word)


def make_policy(spec: str, budget: KVBudget, parts: tuple[type[Part], ...] = PARTS) -> Policy:
    """``"snapkv"``, ``"kivi4"`` or a combination such as ``"snapkv+kivi4"`` (at most one of each
    slot); ``parts``: the kinds to parse with. The policy checks that its parts go together."""
    found = sorted((parse_part(word.strip().lower(), parts) for word in spec.split("+")), key=lambda p: p[0])
    return Policy(tuple(part for _, part in found), budget)


def describe_policies() -> list[tuple[str, str]]:
    return [row for kind in PARTS for row in kind.rows()]
