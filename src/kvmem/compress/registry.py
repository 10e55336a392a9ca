"""Every compression method by name: the CLI, the benchmark and the tests find them here."""

from __future__ import annotations

from kvmem.compress.allocator import ALLOCATORS, Uniform
from kvmem.compress.bfp import BlockFloat
from kvmem.compress.bits import describe_bits
from kvmem.compress.budget import KVBudget
from kvmem.compress.heads import AdaKV
from kvmem.compress.kivi import KIVI
from kvmem.compress.merge import Merge
from kvmem.compress.mixed import NAME as MIXED
from kvmem.compress.mixed import MixedPrecision
from kvmem.compress.offload import Offload
from kvmem.compress.policy import SLIDING, Policy
from kvmem.compress.residual import RotatedTokens, parse_residual
from kvmem.compress.rotated import RotatedQuant, parse_rotated
from kvmem.compress.scorer import Scorer
from kvmem.compress.scorers.h2o import H2O
from kvmem.compress.scorers.key_norm import KeyNorm
from kvmem.compress.scorers.random import RandomScorer
from kvmem.compress.scorers.scissorhands import Scissorhands
from kvmem.compress.scorers.snapkv import SnapKV
from kvmem.compress.scorers.streaming_llm import StreamingLLM
from kvmem.compress.scorers.tova import TOVA
from kvmem.errors import KVMemError
from kvmem.model.format import Quantizer

SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls for cls in (StreamingLLM, H2O, Scissorhands, SnapKV, TOVA, KeyNorm, RandomScorer)
}


QUANTIZERS: dict[str, Quantizer] = {
    q.name: q
    for q in (
        KIVI(2),
        KIVI(4),
        KIVI(8),
        BlockFloat(4),
        BlockFloat(8),
        RotatedQuant(4, 4),
        RotatedQuant(3, 3),
        RotatedQuant(4, 2),
        RotatedQuant(3, 2),
        RotatedQuant(2, 2),
        RotatedQuant(3, 3, "uniform"),
    )
}
"""The quantizers listed by ``kvmem policies``; any ``rot…`` width pair is accepted (``find_quantizer``)."""


RESIDUALS = {r.name: r for r in (RotatedTokens(8), RotatedTokens(4))}
"""The residual formats listed by ``kvmem policies``; ``res4`` … ``res8`` are accepted."""


def find_quantizer(name: str) -> Quantizer | None:
    """A registered quantizer, or a rotated one of any widths (``rotk4v3``, ``rotu2``); else None."""
    return QUANTIZERS.get(name) or parse_rotated(name)


class UnknownPolicyError(KVMemError):
    """The policy name is not registered."""


def make_scorer(name: str) -> Scorer:
    try:
        return SCORERS[name.strip().lower()]()
    except KeyError:
        parts = [*SCORERS, *ALLOCATORS, AdaKV.name, MIXED, f"{MIXED}-<format>", Merge.name]
        parts.append(f"{SLIDING}-<format>")
        known = ", ".join([*parts, *QUANTIZERS, *RESIDUALS, Offload.name])
        raise UnknownPolicyError(
            f"unknown policy {name!r}; known policies: {known}, or one of each joined by '+' "
            "(see `kvmem policies`)"
        ) from None


def make_policy(spec: str, budget: KVBudget) -> Policy:
    """``"snapkv"``, ``"kivi4"`` or a combination such as ``"snapkv+kivi4"`` (at most one of each)."""
    scorers, quants, allocators, merges, heads, mixed, residuals = [], [], [], [], [], [], []
    slidings: list[Quantizer] = []
    offloads: list[Offload] = []
    parts = [p.strip().lower() for p in spec.split("+")]
    for part in parts:
        if part == MIXED:
            mixed.append(MixedPrecision())
        elif part.startswith(MIXED + "-"):
            low = find_quantizer(part.removeprefix(MIXED + "-"))
            if low is None:
                raise UnknownPolicyError(
                    f"policy {spec!r}: {part!r} names no block format (mixed-kivi2, mixed-rot2, …)"
                )
            mixed.append(MixedPrecision(low))
        elif part.startswith(SLIDING + "-"):
            local = find_quantizer(part.removeprefix(SLIDING + "-"))
            if local is None:
                raise UnknownPolicyError(
                    f"policy {spec!r}: {part!r} names no block format (sliding-rotk3v2, sliding-kivi2, …)"
                )
            slidings.append(local)
        elif (residual := parse_residual(part)) is not None:
            residuals.append(residual)
        elif part == Merge.name:
            merges.append(Merge())
        elif part == Offload.name:
            offloads.append(Offload())
        elif part == AdaKV.name:
            heads.append(AdaKV())
        elif (quantizer := find_quantizer(part)) is not None:
            quants.append(quantizer)
        elif part in ALLOCATORS:
            allocators.append(ALLOCATORS[part])
        else:
            scorers.append(make_scorer(part))
    if offloads and (scorers or allocators or merges or heads or mixed):
        raise UnknownPolicyError(
            f"policy {spec!r}: offload combines with block formats only (offload+rotk4v2+res8, "
            "offload+rotk4v2+sliding-rot2+res6)"
        )
    groups = (scorers, quants, allocators, merges, heads, mixed, residuals, slidings, offloads)
    if any(len(p) > 1 for p in groups):
        raise UnknownPolicyError(
            f"policy {spec!r}: combine at most one eviction method, one layer allocation, one head "
            "allocation, merging, one quantizer, one for sliding layers and one residual format"
        )
    if residuals and not quants and not slidings:
        raise UnknownPolicyError(
            f"policy {spec!r}: {residuals[0].name} holds the block being filled at low bits beside a "
            "block format; add one (rotk4v2+res8, kivi4+res8, …)"
        )
    if (allocators or merges or heads or mixed) and not scorers:
        raise UnknownPolicyError(f"policy {spec!r}: '{spec}' needs an eviction method to apply")
    if heads and not scorers[0].per_head:
        raise UnknownPolicyError(
            f"policy {spec!r}: adakv needs scores per head; {scorers[0].name} scores every head alike"
        )
    if heads and merges:
        raise UnknownPolicyError(f"policy {spec!r}: adakv cannot be combined with merging")
    if mixed and (heads or merges):
        raise UnknownPolicyError(f"policy {spec!r}: mixed cannot be combined with adakv or merging")
    return Policy(
        scorers[0] if scorers else None,
        budget,
        quants[0] if quants else None,
        allocators[0] if allocators else Uniform(),
        merges[0] if merges else None,
        heads[0] if heads else None,
        mixed[0] if mixed else None,
        offload=offloads[0] if offloads else None,
        residual=residuals[0] if residuals else None,
        sliding=slidings[0] if slidings else None,
    )


def describe_policies() -> list[tuple[str, str]]:
    rows = [(name, cls.summary) for name, cls in SCORERS.items()]
    rows += [(name, a.summary) for name, a in ALLOCATORS.items() if name != "uniform"]
    rows.append((AdaKV.name, AdaKV.summary))
    rows.append((MIXED, MixedPrecision.summary))
    rows.append((Merge.name, Merge.summary))
    rows.append(
        (
            f"{SLIDING}-<format>",
            "the sliding-window layers' blocks at <format> (the full-attention layers at the policy's "
            "quantizer, or full precision): precision by layer",
        )
    )
    rows += [(name, f"{q.summary} ({describe_bits(q)})") for name, q in QUANTIZERS.items()]
    rows += [(name, f"{r.summary} ({describe_bits(r)})") for name, r in RESIDUALS.items()]
    rows.append((Offload.name, Offload.summary))
    return rows
