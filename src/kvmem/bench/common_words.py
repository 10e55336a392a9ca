"""Common-word extraction (RULER's ``cwe``): a long numbered list of words, a few far more frequent.

Prompt, shortened (``answer`` is ``" scope, frame, ..."``, the top words in order of first appearance)::

    Below is a numbered list of words. In these words, some appear more often than others.
    Memorize the ones that appear most often.

    1. binding 2. scope 3. lexical 4. scope 5. frame ...

    Question: What are the 10 most common words in the list above?
    Answer: The 10 most common words in the list are:

Words come from ``kvmem.bench.words`` (~1,300 words). The ``top_n`` common words appear
``common_freq`` times each (by default 30, as in RULER, lowered for short lengths); the rest of the
list is rare words, ``rare_freq`` times each while the vocabulary lasts, then spread evenly over it,
always fewer than ``common_freq`` times. Scored as the fraction of the top words found.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

from kvmem.bench.example import AnswerKind, Context, Question
from kvmem.bench.task import Task, TaskLengthError, fit_context
from kvmem.bench.tokens import TokenCounter
from kvmem.bench.words import vocabulary

INTRO = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n\n"
)


def question_for(top_n: int) -> str:
    return (
        f"Question: What are the {top_n} most common words in the list above?\n"
        f"Answer: The {top_n} most common words in the list are:"
    )


# tried in turn when ``common_freq`` is not given: the first that leaves at least as many rare entries
# as common ones in the length wins, so short contexts still hold a real list
FREQUENCY_LADDER = (30, 20, 10, 6, 4)


def word_list(
    common: list[str], rare: list[str], common_freq: int, rare_freq: int, n_rare: int, seed: int
) -> list[str]:
    """Each common word ``common_freq`` times and ``n_rare`` rare entries, shuffled by ``seed``.

    Rare entries use ``n_rare / rare_freq`` distinct words while the vocabulary lasts, then spread
    evenly over all of it.
    """
    distinct = min(len(rare), -(-n_rare // rare_freq))
    items = common * common_freq + [rare[i % distinct] for i in range(n_rare)]
    random.Random(seed).shuffle(items)
    return items


@dataclass(frozen=True)
class CommonWords(Task):
    """The ``top_n`` most frequent words of a list fitted to the length. One question per context.

    ``common_freq=None`` picks the first of ``FREQUENCY_LADDER`` (above ``rare_freq``) whose common
    words fill at most half the list at this length; the choice is in ``meta["common_freq_used"]``.
    """

    name: ClassVar[str] = "common_words"
    kind: ClassVar[AnswerKind] = "word"
    top_n: int = 10
    common_freq: int | None = None
    rare_freq: int = 3

    def __post_init__(self) -> None:
        if not 1 <= self.top_n < len(vocabulary()) or self.rare_freq < 1:
            raise ValueError("need 1 <= top_n < vocabulary size and rare_freq >= 1")
        if self.common_freq is not None and self.common_freq <= self.rare_freq:
            raise ValueError("common_freq must be larger than rare_freq")

    def make_context(self, tokenizer: TokenCounter, length: int, seed: int) -> Context:
        rng = random.Random(seed)
        words = rng.sample(vocabulary(), len(vocabulary()))
        common, rare = words[: self.top_n], words[self.top_n :]
        shuffle_seed = rng.getrandbits(64)
        question = question_for(self.top_n)
        if self.common_freq is not None:
            ladder, share = [self.common_freq], 0
        else:
            ladder, share = [f for f in FREQUENCY_LADDER if f > self.rare_freq], 1
        for freq in ladder:

            def build(n_rare: int, freq: int = freq) -> tuple[str, list[str]]:
                items = word_list(common, rare, freq, self.rare_freq, n_rare, shuffle_seed)
                listing = " ".join(f"{i}. {w}" for i, w in enumerate(items, 1))
                return INTRO + listing + "\n\n", [question]

            try:
                # at most (freq - 1) * len(rare) rare entries, so rare words stay rarer than common ones
                limit = (freq - 1) * len(rare)
                n_rare = fit_context(self.name, build, tokenizer, length, share * self.top_n * freq, limit)
            except TaskLengthError:
                continue
            items = word_list(common, rare, freq, self.rare_freq, n_rare, shuffle_seed)
            assert max(Counter(items)[w] for w in rare) < freq
            common_set = set(common)
            gold = tuple(dict.fromkeys(w for w in items if w in common_set))
            meta = {**self.meta(seed, length), "common_freq_used": freq, "entries": len(items)}
            asked = Question(question, " " + ", ".join(gold), gold)
            return Context(self.name, build(n_rare)[0], (asked,), self.kind, meta)
        raise TaskLengthError(
            f"{length} tokens is too short for the common_words task: {self.top_n} common words "
            f"{ladder[-1]} times each do not fit; raise the length or lower top_n"
        )
