"""Pass key retrieval (Mohtashami & Jaggi, 2023): one number hidden in filler prose.

Prompt, shortened (``answer`` is ``" 71432"``)::

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I
    will quiz you about the important information there.

    Names in the target list ... The pass key is 71432. Remember it. A class definition is ...

    Question: What is the pass key?
    Answer: The pass key is
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from kvmem.bench.example import AnswerKind, Context, Question
from kvmem.bench.haystack import Needle, random_start
from kvmem.bench.needle import depth_of, needle_context
from kvmem.bench.task import Task
from kvmem.bench.tokens import TokenCounter
from kvmem.bench.words import distinct_numbers

# The original wording (Mohtashami & Jaggi). An intro that says "a pass key" primes small models to
# answer "The pass key is ... hidden inside a lot of irrelevant text": they copy the intro instead of
# retrieving the needle (SmolLM2 at 1.5k and Gemma 3 at 3k failed every pass key that way).
INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
QUESTION = "Question: What is the pass key?\nAnswer: The pass key is"


@dataclass(frozen=True)
class Passkey(Task):
    """A single needle at ``depth`` (0: start of the haystack, 1: its end). One question per context."""

    name: ClassVar[str] = "passkey"
    kind: ClassVar[AnswerKind] = "number"
    depth: float = 0.5
    digits: int = 5

    def __post_init__(self) -> None:
        if not 0.0 <= self.depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {self.depth}")
        if not 1 <= self.digits <= 18:
            raise ValueError(f"digits must be in [1, 18], got {self.digits}")

    def make_context(self, tokenizer: TokenCounter, length: int, seed: int) -> Context:
        rng = random.Random(seed)
        (key,) = distinct_numbers(rng, 1, self.digits)
        needle = Needle(self.depth, f"The pass key is {key}. Remember it.")
        ctx = needle_context(self.name, INTRO, [needle], [QUESTION], tokenizer, length, random_start(rng))
        offset = ctx.offsets[0] + len("The pass key is ")
        meta = {"answer_offset": offset, "depth_actual": depth_of(ctx, ctx.offsets[0])}
        question = Question(QUESTION, f" {key}", (key,), meta)
        return Context(self.name, ctx.text, (question,), self.kind, self.meta(seed, length))
