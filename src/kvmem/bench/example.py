"""What a task produces: an ``Example`` (one prompt and its gold answer) and a ``Context`` (one long
context with several questions over it, for the bench's multi-turn mode).

Prompts are completion-style: ``prompt == context + question`` and it ends exactly where the answer
starts (``"... Answer: The pass key is"``, answer ``" 71432"``); the small embedded models answer such
prompts far better than chat turns. ``context`` is the long part prefilled once; ``question`` the
short part asked after it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

# How an answer looks, so the scorer can pick answer-like tokens out of a model's output
# (see ``kvmem.bench.scoring``): a number, a UUID, a variable name (upper case), an English word,
# or free text (real text, scored by its log-probability).
AnswerKind = Literal["number", "uuid", "name", "word", "text"]


@dataclass(frozen=True)
class Question:
    """One question over a context: the text asked, the gold continuation and the gold items in it."""

    question: str  # ends where the answer starts
    answer: str  # the gold continuation, e.g. " 71432" or " 1234567, 2345678"
    gold: tuple[str, ...]  # the items the answer lists (one for single-answer tasks)
    meta: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.gold:
            raise ValueError("a question needs at least one gold item")


@dataclass(frozen=True)
class Example:
    """One benchmark item: ``prompt`` (``context + question``) and the gold ``answer`` continuation."""

    task: str
    context: str
    question: str
    answer: str
    gold: tuple[str, ...]
    kind: AnswerKind
    meta: Mapping[str, object] = field(default_factory=dict)  # seed, length, depth, ...

    @property
    def prompt(self) -> str:
        return self.context + self.question


@dataclass(frozen=True)
class Context:
    """A long context and every question a task asks over it (each prompt fits the target length)."""

    task: str
    text: str
    questions: tuple[Question, ...]
    kind: AnswerKind
    meta: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.questions:
            raise ValueError("a context needs at least one question")

    @property
    def examples(self) -> tuple[Example, ...]:
        """One ``Example`` per question, all sharing this context; question meta overrides context meta."""
        return tuple(
            Example(
                task=self.task,
                context=self.text,
                question=q.question,
                answer=q.answer,
                gold=q.gold,
                kind=self.kind,
                meta={**self.meta, **q.meta},
            )
            for q in self.questions
        )
