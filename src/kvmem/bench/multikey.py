"""Multi-key needles (RULER's ``niah_multikey``): several magic numbers, each under its own key.

Prompt, shortened (``answer`` is ``" 4820931"``)::

    Some special magic numbers are hidden inside the following text. Make sure to memorize them.
    I will quiz you about the numbers afterwards.

    ... The special magic number for lexical-frame is 4820931. ... The special magic number for
    binding-scope is 7713025. ...

    Question: What is the special magic number for lexical-frame?
    Answer: The special magic number for lexical-frame is
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from kvmem.bench.example import AnswerKind, Context, Question
from kvmem.bench.haystack import Needle, random_start, spread
from kvmem.bench.needle import depth_of, needle_context
from kvmem.bench.task import Task
from kvmem.bench.tokens import TokenCounter
from kvmem.bench.words import distinct_keys, distinct_numbers

INTRO = (
    "Some special magic numbers are hidden inside the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards.\n\n"
)


def question_for(key: str) -> str:
    return (
        f"Question: What is the special magic number for {key}?\n"
        f"Answer: The special magic number for {key} is"
    )


@dataclass(frozen=True)
class MultiKey(Task):
    """``num_keys`` needles with distinct keys at depths ``spread(depth, num_keys)``.

    The context asks for every key, first the one at ``depth``; ``generate`` asks for that one only,
    the others being distractors.
    """

    name: ClassVar[str] = "multikey"
    kind: ClassVar[AnswerKind] = "number"
    depth: float = 0.5
    num_keys: int = 4
    digits: int = 7

    def __post_init__(self) -> None:
        if not 0.0 <= self.depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {self.depth}")
        if self.num_keys < 1 or not 2 <= self.digits <= 18:
            raise ValueError("num_keys must be at least 1 and digits in [2, 18]")

    def make_context(self, tokenizer: TokenCounter, length: int, seed: int) -> Context:
        rng = random.Random(seed)
        keys = distinct_keys(rng, self.num_keys)
        values = distinct_numbers(rng, self.num_keys, self.digits)
        depths = spread(self.depth, self.num_keys)
        needles = [
            Needle(d, f"The special magic number for {k} is {v}.") for d, k, v in zip(depths, keys, values)
        ]
        asked = [question_for(k) for k in keys]
        ctx = needle_context(self.name, INTRO, needles, asked, tokenizer, length, random_start(rng))
        questions = tuple(
            Question(
                q,
                f" {v}",
                (v,),
                {
                    "key": k,
                    "depth": d,
                    "depth_actual": depth_of(ctx, offset),
                    "answer_offset": offset + len(n.text) - len(v) - 1,
                },
            )
            for q, k, v, d, n, offset in zip(asked, keys, values, depths, needles, ctx.offsets)
        )
        return Context(self.name, ctx.text, questions, self.kind, self.meta(seed, length))
