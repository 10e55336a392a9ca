"""Key-value retrieval (Liu et al., "Lost in the Middle"; RULER): random UUID pairs in a JSON object.

Prompt, shortened (``answer`` is ``' "9b1e...-...-c07d"'``)::

    Extract the value corresponding to the specified key in the JSON object below.

    JSON data:
    {"3f2a...": "77c1...",
     "5d0e...": "9b1e...",
     ...}

    Question: What is the value associated with key "5d0e..."?
    Answer: The value associated with key "5d0e..." is

There is no filler: the object grows one pair at a time to fit the length. The asked pair sits at
``depth`` (0: the first pair, 1: the last).
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import ClassVar

from kvmem.bench.example import AnswerKind, Context, Question
from kvmem.bench.haystack import spread
from kvmem.bench.task import Task, fit_context
from kvmem.bench.tokens import TokenCounter

INTRO = "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n"


def question_for(key: str) -> str:
    return (
        f'Question: What is the value associated with key "{key}"?\n'
        f'Answer: The value associated with key "{key}" is'
    )


class _Pairs:
    """An endless seeded stream of (key, value) UUID pairs; ``first(n)`` is the same for every n."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._pairs: list[tuple[str, str]] = []

    def first(self, n: int) -> list[tuple[str, str]]:
        while len(self._pairs) < n:
            key, value = (str(uuid.UUID(int=self._rng.getrandbits(128), version=4)) for _ in range(2))
            self._pairs.append((key, value))
        return self._pairs[:n]


def asked_index(depth: float, n: int) -> int:
    """The pair at ``depth`` among ``n`` (rounding half up, so evenly spread depths stay distinct)."""
    return int(depth * (n - 1) + 0.5)


@dataclass(frozen=True)
class KVRetrieval(Task):
    """Asks for ``num_questions`` keys at depths ``spread(depth, num_questions)``, the first at ``depth``."""

    name: ClassVar[str] = "kv_retrieval"
    kind: ClassVar[AnswerKind] = "uuid"
    depth: float = 0.5
    num_questions: int = 4

    def __post_init__(self) -> None:
        if not 0.0 <= self.depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {self.depth}")
        if self.num_questions < 1:
            raise ValueError("num_questions must be at least 1")

    def make_context(self, tokenizer: TokenCounter, length: int, seed: int) -> Context:
        pairs = _Pairs(random.Random(seed).getrandbits(64))
        depths = spread(self.depth, self.num_questions)

        def build(n: int) -> tuple[str, list[str]]:
            chosen = pairs.first(n)
            body = ",\n ".join(f'"{k}": "{v}"' for k, v in chosen)
            asked = [chosen[asked_index(d, n)][0] for d in depths]
            return INTRO + "{" + body + "}\n\n", [question_for(k) for k in asked]

        n = fit_context(self.name, build, tokenizer, length, minimum=self.num_questions + 1)
        text, asked = build(n)
        questions = []
        for depth, question in zip(depths, asked):
            index = asked_index(depth, n)
            key, value = pairs.first(n)[index]
            meta = {"key": key, "depth": depth, "pair_index": index, "answer_offset": text.index(value)}
            questions.append(Question(question, f' "{value}"', (value,), meta))
        return Context(self.name, text, tuple(questions), self.kind, {**self.meta(seed, length), "pairs": n})
