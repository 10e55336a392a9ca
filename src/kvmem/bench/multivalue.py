"""Multi-value needles (RULER's ``niah_multivalue``): one key holding several magic numbers.

Prompt, shortened (``answer`` is ``" 4820931, 7713025, 1096457, 5532180"``, in order of appearance)::

    Some special magic numbers are hidden inside the following text. ...

    ... One of the special magic numbers for lexical-frame is 4820931. ... One of the special
    magic numbers for lexical-frame is 7713025. ...

    Question: What are all the special magic numbers for lexical-frame?
    Answer: The special magic numbers for lexical-frame are:

Scored as the fraction of the values found (``kvmem.bench.scoring``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from kvmem.bench.example import AnswerKind, Context, Question
from kvmem.bench.haystack import Needle, random_start, spread
from kvmem.bench.multikey import INTRO
from kvmem.bench.needle import needle_context
from kvmem.bench.task import Task
from kvmem.bench.tokens import TokenCounter
from kvmem.bench.words import distinct_keys, distinct_numbers


def question_for(key: str) -> str:
    return (
        f"Question: What are all the special magic numbers for {key}?\n"
        f"Answer: The special magic numbers for {key} are:"
    )


@dataclass(frozen=True)
class MultiValue(Task):
    """``num_keys`` keys with ``num_values`` values each, all needles at ``spread(depth, keys * values)``.

    Needles go to keys round-robin, so the first key's values sit at ``spread(depth, num_values)``:
    the first at ``depth``, the rest evenly around the haystack. The context asks for every key.
    """

    name: ClassVar[str] = "multivalue"
    kind: ClassVar[AnswerKind] = "number"
    depth: float = 0.5
    num_values: int = 4
    num_keys: int = 1
    digits: int = 7

    def __post_init__(self) -> None:
        if not 0.0 <= self.depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {self.depth}")
        if self.num_keys < 1 or self.num_values < 1 or not 2 <= self.digits <= 18:
            raise ValueError("num_keys and num_values must be at least 1 and digits in [2, 18]")

    def make_context(self, tokenizer: TokenCounter, length: int, seed: int) -> Context:
        rng = random.Random(seed)
        keys = distinct_keys(rng, self.num_keys)
        count = self.num_keys * self.num_values
        values = distinct_numbers(rng, count, self.digits)
        needles = [
            Needle(d, f"One of the special magic numbers for {keys[i % self.num_keys]} is {v}.")
            for i, (d, v) in enumerate(zip(spread(self.depth, count), values))
        ]
        asked = [question_for(k) for k in keys]
        ctx = needle_context(self.name, INTRO, needles, asked, tokenizer, length, random_start(rng))
        questions = []
        for j, (key, question) in enumerate(zip(keys, asked)):
            mine = sorted(range(j, count, self.num_keys), key=lambda i: ctx.offsets[i])
            gold = tuple(values[i] for i in mine)
            meta = {"key": key, "answer_offsets": tuple(ctx.text.index(values[i]) for i in mine)}
            questions.append(Question(question, " " + ", ".join(gold), gold, meta))
        return Context(self.name, ctx.text, tuple(questions), self.kind, self.meta(seed, length))
