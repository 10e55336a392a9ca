"""Variable tracking (RULER's ``vt``): chains of assignments hidden in filler prose; which variables
end up holding a value?

Prompt, shortened (``answer`` is ``" QPEXR, SGKTA, MBWZO, LUDIE, HNCFY"``, the chain in order)::

    Memorize and track the chains of variable assignments hidden in the following text.

    ... VAR QPEXR = 64334. ... VAR SGKTA = QPEXR. ... VAR MBWZO = SGKTA. ...

    Question: Find all variables that are assigned the value 64334 in the text above.
    Answer: The variables assigned the value 64334 are:

Scored as the fraction of the chain's variables found (``kvmem.bench.scoring``).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import ClassVar

from kvmem.bench.example import AnswerKind, Context, Question
from kvmem.bench.haystack import Needle, random_start
from kvmem.bench.needle import needle_context
from kvmem.bench.task import Task
from kvmem.bench.tokens import TokenCounter
from kvmem.bench.words import distinct_numbers

INTRO = "Memorize and track the chains of variable assignments hidden in the following text.\n\n"


def question_for(value: str) -> str:
    return (
        f"Question: Find all variables that are assigned the value {value} in the text above.\n"
        f"Answer: The variables assigned the value {value} are:"
    )


def distinct_names(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct variable names of five upper-case letters."""
    names: dict[str, None] = {}
    while len(names) < count:
        names.setdefault("".join(rng.choices(string.ascii_uppercase, k=5)))
    return list(names)


@dataclass(frozen=True)
class VarTrack(Task):
    """``num_chains`` chains of ``num_hops`` copies each (``num_hops + 1`` variables per value).

    Each chain's statements sit at sorted random depths, so a chain reads in order but interleaves
    with the others. The context asks about every chain's value, first chain first.
    """

    name: ClassVar[str] = "vartrack"
    kind: ClassVar[AnswerKind] = "name"
    num_chains: int = 2
    num_hops: int = 4
    digits: int = 5

    def __post_init__(self) -> None:
        if self.num_chains < 1 or self.num_hops < 1 or not 2 <= self.digits <= 18:
            raise ValueError("num_chains and num_hops must be at least 1 and digits in [2, 18]")

    def make_context(self, tokenizer: TokenCounter, length: int, seed: int) -> Context:
        rng = random.Random(seed)
        values = distinct_numbers(rng, self.num_chains, self.digits)
        names = distinct_names(rng, self.num_chains * (self.num_hops + 1))
        chains = [
            names[c * (self.num_hops + 1) : (c + 1) * (self.num_hops + 1)] for c in range(self.num_chains)
        ]
        needles: list[Needle] = []
        for value, chain in zip(values, chains):
            depths = sorted(rng.random() for _ in chain)
            sources = [value, *chain[:-1]]
            needles += [Needle(d, f"VAR {var} = {src}.") for d, var, src in zip(depths, chain, sources)]
        asked = [question_for(v) for v in values]
        ctx = needle_context(self.name, INTRO, needles, asked, tokenizer, length, random_start(rng))
        questions = tuple(
            Question(
                q, " " + ", ".join(chain), tuple(chain), {"value": v, "answer_offset": ctx.text.index(v)}
            )
            for q, v, chain in zip(asked, values, chains)
        )
        return Context(self.name, ctx.text, questions, self.kind, self.meta(seed, length))
