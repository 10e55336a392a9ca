"""Needles in a haystack: short sentences placed at given depths in filler prose, fitted to a length.

Shared by the needle tasks (pass key, multi-key, multi-value) and variable tracking. The context is
``intro + haystack + "\\n\\n"``; the haystack is consecutive filler sentences (``kvmem.bench.haystack``)
from a seeded start, with every needle at the sentence boundary nearest its depth. Depth is a
fraction of the haystack: 0.0 right after the intro, 1.0 right before the question.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from kvmem.bench.haystack import Needle, filler, insert_needles
from kvmem.bench.task import fit_context
from kvmem.bench.tokens import TokenCounter


class NeedleContext(NamedTuple):
    text: str
    offsets: tuple[int, ...]  # character offset of each needle in ``text``
    haystack: tuple[int, int]  # [start, end) character span of the haystack in ``text``
    sentences: int  # filler sentences used


def needle_context(
    task: str,
    intro: str,
    needles: Sequence[Needle],
    questions: Sequence[str],
    tokenizer: TokenCounter,
    length: int,
    start: int,
) -> NeedleContext:
    """The longest haystack from filler sentence ``start`` such that every prompt fits ``length``."""

    def build(n: int) -> NeedleContext:
        haystack = insert_needles(filler(start, n), needles)
        offsets = tuple(len(intro) + o for o in haystack.offsets)
        span = (len(intro), len(intro) + len(haystack.text))
        return NeedleContext(intro + haystack.text + "\n\n", offsets, span, n)

    n = fit_context(task, lambda n: (build(n).text, questions), tokenizer, length)
    return build(n)


def depth_of(context: NeedleContext, offset: int) -> float:
    """Where a character offset sits in the haystack, as a fraction of its length."""
    start, end = context.haystack
    return (offset - start) / max(1, end - start)
