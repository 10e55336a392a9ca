"""The ``Task`` contract every benchmark task follows, and the length fitting they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import ClassVar

from kvmem.bench.example import AnswerKind, Context, Example
from kvmem.bench.tokens import TokenCounter, largest_fitting, length_fn
from kvmem.errors import KVMemError


class TaskLengthError(KVMemError, ValueError):
    """The target length is too short for the task's smallest context (or its parameters)."""


@dataclass(frozen=True)
class Task(ABC):
    """A seeded, offline generator of long-context examples; its fields are the task's parameters.

    Contract: ``make_context`` is a pure function of the task's fields, ``length`` and ``seed`` (it
    draws from ``random.Random(seed)`` only, never global random state, and downloads nothing), and
    every prompt it returns (``context + question``) is at most ``length`` tokens as counted by
    ``tokenizer`` and as close to it as the task's unit (a sentence, a JSON pair, a word) allows.
    Raises ``TaskLengthError`` when ``length`` cannot hold the task at all.
    """

    name: ClassVar[str]
    kind: ClassVar[AnswerKind]

    @abstractmethod
    def make_context(self, tokenizer: TokenCounter, length: int, seed: int) -> Context:
        """One context and every question the task asks over it (for multi-turn runs)."""

    def generate(self, tokenizer: TokenCounter, length: int, seed: int) -> Example:
        """One example: the context's first question (for needle tasks the needle at ``depth``)."""
        return self.make_context(tokenizer, length, seed).examples[0]

    def meta(self, seed: int, length: int) -> dict[str, object]:
        """What every example records: the task's parameters, the seed and the target length."""
        return {**asdict(self), "seed": seed, "length": length}


def fit_context(
    task: str,
    build: Callable[[int], tuple[str, Sequence[str]]],
    tokenizer: TokenCounter,
    length: int,
    minimum: int = 0,
    limit: int | None = None,
) -> int:
    """The largest unit count ``n`` (in ``[minimum, limit]``) whose context fits with every question.

    ``build(n)`` (called with ``n >= minimum`` only) returns the context made of ``n`` units
    (sentences, pairs, words) and the questions asked over it; it must grow with ``n``. Each probe
    measures the context with its longest question; the answer found is then checked with every one.
    """
    count = length_fn(tokenizer)

    def fits_with(n: int, all_questions: bool) -> bool:
        context, questions = build(n)
        asked = questions if all_questions else [max(questions, key=count)]
        return all(count(context + q) <= length for q in asked)

    if limit is not None and limit < minimum:
        raise TaskLengthError(f"the {task} task needs {minimum} units but has only {limit}")
    extra = largest_fitting(
        lambda k: fits_with(minimum + k, all_questions=False), None if limit is None else limit - minimum
    )
    n = None if extra is None else minimum + extra
    while n is not None and not fits_with(n, all_questions=True):
        n = n - 1 if n > minimum else None
    if n is None:
        raise TaskLengthError(
            f"{length} tokens is too short for the {task} task: its smallest context does not fit; "
            "raise the length or lower the task's counts"
        )
    return n
