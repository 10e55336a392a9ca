"""Scoring a model's output against an ``Example``: strict exact match on the first answer-like tokens.

The output is split into word-like tokens (letters, digits and inner hyphens, so a UUID stays one
token; punctuation, quotes and markdown are dropped) and only those that look like the answer's kind
are kept: numbers for ``number``, hex-and-hyphen tokens holding a digit for ``uuid``, five capital
letters for ``name``, lower-cased words other than "and"/"or"/"the" for ``word``.

- one gold item: the first answer-like token must equal it exactly: 1.0 or 0.0. A truncated number
  ("7143" for "71432") or one with an extra digit ("714321") scores 0; text after the answer is ignored.
- several gold items (multi-value, variable tracking, top-N words): the first ``len(gold)``
  answer-like tokens are taken and the score is the fraction of gold items among them, so listing
  every number in the context earns nothing extra and order does not matter.
- ``text`` (real text): the fraction of the gold continuation's whitespace-separated words that the
  output reproduces, in order, before its first mistake. The bench measures real text by
  log-probability; this is only a greedy agreement check.
"""

from __future__ import annotations

import re

from kvmem.bench.example import AnswerKind, Example

_TOKEN = re.compile(r"[0-9A-Za-z]+(?:-[0-9A-Za-z]+)*")
_ANSWER_LIKE: dict[AnswerKind, re.Pattern[str]] = {
    "number": re.compile(r"[0-9]+"),
    "uuid": re.compile(r"(?=.*[0-9])[0-9a-f]+(?:-[0-9a-f]+)*"),
    "name": re.compile(r"[A-Z]{5}"),
    "word": re.compile(r"[a-z]+"),
}
_CONNECTIVES = frozenset({"and", "or", "the"})


def answer_tokens(output: str, kind: AnswerKind) -> list[str]:
    """The answer-like tokens of ``output`` in order, normalised (UUIDs and words lower-cased)."""
    if kind == "text":
        return output.split()
    pattern = _ANSWER_LIKE[kind]
    tokens = _TOKEN.findall(output)
    if kind in ("uuid", "word"):
        tokens = [t.lower() for t in tokens]
    if kind == "word":
        tokens = [t for t in tokens if t not in _CONNECTIVES]
    return [t for t in tokens if pattern.fullmatch(t)]


def score(example: Example, output: str) -> float:
    """1.0 for a correct answer, 0.0 for a wrong one; the fraction found when there are several."""
    found = answer_tokens(output, example.kind)
    if example.kind == "text":
        gold_words = example.answer.split()
        agreed = 0
        for want, got in zip(gold_words, found):
            if want != got:
                break
            agreed += 1
        return agreed / len(gold_words) if gold_words else 1.0
    gold = [g.lower() if example.kind in ("uuid", "word") else g for g in example.gold]
    if len(gold) == 1:
        return 1.0 if found[:1] == gold else 0.0
    head = set(found[: len(gold)])
    return sum(g in head for g in gold) / len(gold)


def answer_for_logprob(example: Example) -> str:
    """The gold continuation the bench teacher-forces after ``example.prompt`` to read its log-probability."""
    return example.answer
