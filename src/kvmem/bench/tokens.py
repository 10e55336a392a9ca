"""Counting tokens: what a task generator needs from a tokenizer, and fitting text to a length.

A generator accepts a *tokenizer* (anything with ``encode(str) -> list[int]``: kvmem's ``LLM``, a
Hugging Face tokenizer, a test's whitespace tokenizer) or a plain length function ``str -> int``.
Special tokens the tokenizer adds (a BOS) are counted, so a prompt that fits here fits the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeAlias, runtime_checkable

LengthFn: TypeAlias = Callable[[str], int]


@runtime_checkable
class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


TokenCounter: TypeAlias = Tokenizer | LengthFn


def length_fn(counter: TokenCounter) -> LengthFn:
    """A function giving the token length of a text, from a tokenizer or a length function."""
    # checked first: Hugging Face tokenizers are callable too, but calling one returns a BatchEncoding
    if isinstance(counter, Tokenizer):
        encode = counter.encode
        return lambda text: len(encode(text))
    return counter


def largest_fitting(fits: Callable[[int], bool], limit: int | None = None) -> int | None:
    """The largest ``n`` in ``[0, limit]`` with ``fits(n)``, or ``None`` when not even 0 fits.

    ``fits`` must be monotone (true up to some ``n``, false after), as "the text built from ``n``
    sentences fits the target length" is. Gallops up then bisects: O(log n) calls.
    """
    if not fits(0):
        return None
    good, step = 0, 1
    while True:  # gallop: find a bad bound
        probe = good + step if limit is None else min(good + step, limit)
        if probe == good:
            return good
        if not fits(probe):
            bad = probe
            break
        good, step = probe, step * 2
    while bad - good > 1:  # invariant: fits(good) and not fits(bad)
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good
