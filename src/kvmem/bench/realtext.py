"""Real text for perplexity and KL against the full cache: Python's reference documentation.

The text is ``pydoc_data.topics`` (the standard library's copy of the language reference behind
``help("topic")``; ~465k characters, always available offline): its topics in sorted order,
starting at a seeded topic and wrapping around. The context is the longest run of whole words that
fits the length; the answer is the next ``continuation_words`` words, which the bench teacher-forces
to compare log-probabilities (and distributions) under a compressed and a full cache. There is no
question (``question == ""``), and the continuation comes on top of the length.

Prompt, shortened (``answer`` is the next words, e.g. ``" statements are used to (re)bind ..."``)::

    Assignment statements
    *********************

    Assignment
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import cache
from pydoc_data.topics import topics
from typing import ClassVar

from kvmem.bench.example import AnswerKind, Context, Question
from kvmem.bench.task import Task, fit_context
from kvmem.bench.tokens import TokenCounter


@cache
def _words_from(first_topic: int) -> tuple[str, ...]:
    """The documentation as words, each with the whitespace before it, starting at the given topic."""
    keys = sorted(topics)
    # every topic opens with a blank line, so the text also reads right where it wraps around
    text = "".join("\n\n" + topics[k].strip() for k in keys[first_topic:] + keys[:first_topic])
    return tuple(re.findall(r"\s*\S+", text))


def _join(words: tuple[str, ...], start: int, count: int) -> str:
    return "".join(words[(start + i) % len(words)] for i in range(count))


def _context(words: tuple[str, ...], count: int) -> str:
    return _join(words, 0, count).lstrip()


@dataclass(frozen=True)
class RealText(Task):
    """A long stretch of real text and its next ``continuation_words`` words."""

    name: ClassVar[str] = "realtext"
    kind: ClassVar[AnswerKind] = "text"
    continuation_words: int = 64

    def __post_init__(self) -> None:
        if self.continuation_words < 1:
            raise ValueError("continuation_words must be at least 1")

    def make_context(self, tokenizer: TokenCounter, length: int, seed: int) -> Context:
        first_topic = random.Random(seed).randrange(len(topics))
        words = _words_from(first_topic)
        n = fit_context(self.name, lambda n: (_context(words, n), [""]), tokenizer, length, minimum=1)
        answer = _join(words, n, self.continuation_words)
        meta = {**self.meta(seed, length), "topic": sorted(topics)[first_topic], "words": n}
        return Context(self.name, _context(words, n), (Question("", answer, (answer,)),), self.kind, meta)
