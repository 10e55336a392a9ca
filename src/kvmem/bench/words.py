"""A vocabulary of plain English words, for needle keys and the common-words list.

Taken from the filler prose (``kvmem.bench.haystack``, i.e. Python's ``pydoc_data.topics``): every
lower-case word of 4 to 10 letters there, minus a few function words, sorted. About 1,500 words.
"""

from __future__ import annotations

import random
import re
from functools import cache

from kvmem.bench.haystack import filler_sentences

_FUNCTION_WORDS = frozenset(
    "also been does from have into more most only other same such than that their them then there "
    "these they this those were what when where which while will with would your".split()
)


@cache
def vocabulary() -> tuple[str, ...]:
    words = {w for s in filler_sentences() for w in re.findall(r"\b[a-z]{4,10}\b", s)}
    return tuple(sorted(words - _FUNCTION_WORDS))


def distinct_keys(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct two-word keys such as ``"lexical-frame"``, drawn from the vocabulary."""
    words = rng.sample(vocabulary(), 2 * count)
    return [f"{a}-{b}" for a, b in zip(words[::2], words[1::2])]


def distinct_numbers(rng: random.Random, count: int, digits: int) -> list[str]:
    """``count`` distinct ``digits``-digit numbers (no leading zero), as strings."""
    return [str(n) for n in rng.sample(range(10 ** (digits - 1), 10**digits), count)]
