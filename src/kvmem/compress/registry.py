"""Every compression method by name: the CLI, the benchmark and the tests find them here."""

from __future__ import annotations

from kvmem.compress.scorer import Scorer
from kvmem.compress.scorers.h2o import H2O
from kvmem.compress.scorers.key_norm import KeyNorm
from kvmem.compress.scorers.random import RandomScorer
from kvmem.compress.scorers.snapkv import SnapKV
from kvmem.compress.scorers.streaming_llm import StreamingLLM
from kvmem.compress.scorers.tova import TOVA
from kvmem.errors import KVMemError

SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls for cls in (StreamingLLM, H2O, SnapKV, TOVA, KeyNorm, RandomScorer)
}


class UnknownPolicyError(KVMemError):
    """The policy name is not registered."""


def make_scorer(name: str) -> Scorer:
    try:
        return SCORERS[name.strip().lower()]()
    except KeyError:
        raise UnknownPolicyError(
            f"unknown policy {name!r}; known policies: {', '.join(SCORERS)} (see `kvmem policies`)"
        ) from None


def describe_policies() -> list[tuple[str, str]]:
    return [(name, cls.summary) for name, cls in SCORERS.items()]
