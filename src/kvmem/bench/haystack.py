"""Filler text for needle tasks: prose sentences from Python's own reference documentation.

The source is ``pydoc_data.topics`` (the text behind ``help("assignment")``), part of the standard
library and so always available offline. Natural prose is a better haystack than a repeated
"The grass is green." line: a model cannot learn to skip it, and it looks like the documents a
cache meets in practice. Only plain prose is kept: sentences of 5 to 60 words with no digits (so no
number in the filler can be mistaken for a pass key), no code, no upper-case runs that look like
variable names; duplicates dropped. That leaves ~800 sentences (~20k words); longer haystacks
wrap around. The text follows the running Python's documentation, so the same seed gives the same
haystack on the same Python minor version.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from functools import cache
from itertools import accumulate
from pydoc_data.topics import topics
from typing import NamedTuple

_SENTENCE = re.compile(r"[A-Z][A-Za-z ,;:'\"()_-]+[a-z)]\.")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CAPS_RUN = re.compile(r"[A-Z]{3,}")


@cache
def filler_sentences() -> tuple[str, ...]:
    """Every prose sentence of ``pydoc_data.topics``, in the documentation's order, deduplicated."""
    seen: dict[str, None] = {}
    for key in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[key]):
            if paragraph.startswith((" ", "-", "=")) or "::" in paragraph:
                continue  # code, grammar, lists and headings
            text = " ".join(paragraph.replace("*", "").split())
            for sentence in _SENTENCE_END.split(text):
                if _SENTENCE.fullmatch(sentence) and 5 <= len(sentence.split()) <= 60:
                    if not _CAPS_RUN.search(sentence):
                        seen.setdefault(sentence)
    return tuple(seen)


def filler(start: int, count: int) -> list[str]:
    """``count`` consecutive filler sentences from index ``start``, wrapping around at the end."""
    pool = filler_sentences()
    return [pool[(start + i) % len(pool)] for i in range(count)]


def random_start(rng: random.Random) -> int:
    return rng.randrange(len(filler_sentences()))


class Needle(NamedTuple):
    depth: float  # 0.0: before the first filler sentence, 1.0: after the last
    text: str


class Haystack(NamedTuple):
    text: str
    offsets: tuple[int, ...]  # character offset of each needle in ``text``, in the order given


def insert_needles(sentences: Sequence[str], needles: Sequence[Needle]) -> Haystack:
    """Join ``sentences`` with spaces, each needle at the sentence boundary nearest its depth.

    Depth is measured in characters of the filler: a needle at depth ``d`` goes to the boundary
    whose share of the filler before it is closest to ``d``. Needles at one boundary keep the order
    given.
    """
    before = list(accumulate((len(s) + 1 for s in sentences), initial=0))  # filler chars before each boundary
    total = max(1, before[-1])
    slots: dict[int, list[int]] = {}
    for i, needle in enumerate(needles):
        if not 0.0 <= needle.depth <= 1.0:
            raise ValueError(f"needle depth must be in [0, 1], got {needle.depth}")
        boundary = min(range(len(before)), key=lambda b: abs(before[b] / total - needle.depth))
        slots.setdefault(boundary, []).append(i)
    parts: list[str] = []
    offsets = [0] * len(needles)
    position = 0
    for boundary in range(len(sentences) + 1):
        pieces = [(i, needles[i].text) for i in slots.get(boundary, [])]
        if boundary < len(sentences):
            pieces.append((-1, sentences[boundary]))
        for i, piece in pieces:
            if parts:
                position += 1  # the joining space
            if i >= 0:
                offsets[i] = position
            parts.append(piece)
            position += len(piece)
    return Haystack(" ".join(parts), tuple(offsets))


def spread(depth: float, count: int) -> tuple[float, ...]:
    """``count`` depths evenly spaced around the unit interval, the first at ``depth``.

    ``spread(0.25, 4) == (0.25, 0.5, 0.75, 0.0)``: sweeping ``depth`` shifts the whole pattern.
    """
    return tuple(round((depth + i / count) % 1.0, 12) if i else depth for i in range(count))
