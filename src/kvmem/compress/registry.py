"""Every compression method by name: the CLI, the benchmark and the tests find them here."""

from __future__ import annotations

from kvmem.compress.allocator import ALLOCATORS, Uniform
from kvmem.compress.budget import KVBudget
from kvmem.compress.kivi import KIVI
from kvmem.compress.merge import Merge
from kvmem.compress.policy import Policy
from kvmem.compress.scorer import Scorer
from kvmem.compress.scorers.h2o import H2O
from kvmem.compress.scorers.key_norm import KeyNorm
from kvmem.compress.scorers.random import RandomScorer
from kvmem.compress.scorers.scissorhands import Scissorhands
from kvmem.compress.scorers.snapkv import SnapKV
from kvmem.compress.scorers.streaming_llm import StreamingLLM
from kvmem.compress.scorers.tova import TOVA
from kvmem.errors import KVMemError

SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls for cls in (StreamingLLM, H2O, Scissorhands, SnapKV, TOVA, KeyNorm, RandomScorer)
}


QUANTIZERS: dict[str, KIVI] = {q.name: q for q in (KIVI(2), KIVI(4), KIVI(8))}
_QUANT_SUMMARY = "KIVI {bits}-bit: keys per channel, values per token, last block exact"


class UnknownPolicyError(KVMemError):
    """The policy name is not registered."""


def make_scorer(name: str) -> Scorer:
    try:
        return SCORERS[name.strip().lower()]()
    except KeyError:
        known = ", ".join([*SCORERS, "pyramid", "merge", *QUANTIZERS])
        raise UnknownPolicyError(
            f"unknown policy {name!r}; known policies: {known}, or one of each joined by '+' "
            "(see `kvmem policies`)"
        ) from None


def make_policy(spec: str, budget: KVBudget) -> Policy:
    """``"snapkv"``, ``"kivi4"`` or a combination such as ``"snapkv+kivi4"`` (at most one of each)."""
    scorers, quants, allocators, merges = [], [], [], []
    for part in (p.strip().lower() for p in spec.split("+")):
        if part == Merge.name:
            merges.append(Merge())
        elif part in QUANTIZERS:
            quants.append(QUANTIZERS[part])
        elif part in ALLOCATORS:
            allocators.append(ALLOCATORS[part])
        else:
            scorers.append(make_scorer(part))
    if len(scorers) > 1 or len(quants) > 1 or len(allocators) > 1 or len(merges) > 1:
        raise UnknownPolicyError(
            f"policy {spec!r}: combine at most one eviction method, one layer allocation and one quantizer"
        )
    if (allocators or merges) and not scorers:
        raise UnknownPolicyError(f"policy {spec!r}: '{spec}' needs an eviction method to apply")
    return Policy(
        scorers[0] if scorers else None,
        budget,
        quants[0] if quants else None,
        allocators[0] if allocators else Uniform(),
        merges[0] if merges else None,
    )


def describe_policies() -> list[tuple[str, str]]:
    rows = [(name, cls.summary) for name, cls in SCORERS.items()]
    rows += [(name, a.summary) for name, a in ALLOCATORS.items() if name != "uniform"]
    rows.append((Merge.name, Merge.summary))
    rows += [(name, _QUANT_SUMMARY.format(bits=q.bits)) for name, q in QUANTIZERS.items()]
    return rows
