from __future__ import annotations

import pytest

from kvmem.bench.example import AnswerKind, Example
from kvmem.bench.scoring import answer_for_logprob, answer_tokens, score


def example(kind: AnswerKind, *gold: str, answer: str | None = None) -> Example:
    return Example(
        task="t",
        context="ctx ",
        question="q",
        answer=answer if answer is not None else " " + ", ".join(gold),
        gold=gold,
        kind=kind,
    )


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (" 71432", 1.0),
        ("71432", 1.0),
        (" 71432. Remember it.", 1.0),  # answer followed by more text
        (" 71432\n\nQuestion: 12345", 1.0),
        (" **71432**", 1.0),
        (" 7143", 0.0),  # truncated
        (" 714321", 0.0),  # extra digit
        (" 7143 2", 0.0),
        (" 12345, 71432", 0.0),  # the first number is the answer
        (" 71,432", 0.0),
        (" unknown", 0.0),
        ("", 0.0),
    ],
)
def test_single_number(output: str, expected: float) -> None:
    assert score(example("number", "71432"), output) == expected


def test_uuid_exact_and_case_insensitive() -> None:
    gold = "5c177693-72c0-46fb-8bb5-a4ce0d1ac3aa"
    ex = example("uuid", gold, answer=f' "{gold}"')
    assert score(ex, f' "{gold}".') == 1.0
    assert score(ex, f" {gold.upper()}") == 1.0
    assert score(ex, f' "{gold[:-1]}"') == 0.0
    assert score(ex, f' "{gold[:13]}" and more') == 0.0
    assert score(ex, f" {gold}0") == 0.0


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (" 111, 222, 333, 444", 1.0),
        (" 444 333 222 111 and more", 1.0),  # order does not matter
        (" 111, 222", 0.5),
        (" 111, 999, 222, 888, 333", 0.5),  # only the first len(gold) count
        (" 111, 111, 111, 111", 0.25),
        (" 11, 222, 333, 444", 0.75),  # a truncated item is wrong
        (" nothing", 0.0),
    ],
)
def test_multi_value_scores_the_fraction_found(output: str, expected: float) -> None:
    assert score(example("number", "111", "222", "333", "444"), output) == expected


def test_names_and_words() -> None:
    names = example("name", "QPEXR", "SGKTA", "MBWZO")
    assert score(names, " QPEXR, SGKTA and MBWZO.") == 1.0
    assert score(names, " VAR QPEXR, VAR SGKTA") == pytest.approx(2 / 3)
    assert score(names, " qpexr") == 0.0  # variable names are case-sensitive
    words = example("word", "scope", "frame")
    assert score(words, " Scope and frame") == 1.0
    assert score(words, "\n1. scope\n2. binding") == 0.5


def test_text_scores_the_agreeing_prefix() -> None:
    ex = example("text", "x", answer=" the quick brown fox")
    assert score(ex, " the quick brown fox jumps") == 1.0
    assert score(ex, " the quick red fox") == 0.5
    assert answer_tokens("a  b\nc", "text") == ["a", "b", "c"]


def test_answer_for_logprob_is_the_gold_continuation() -> None:
    assert answer_for_logprob(example("number", "71432")) == " 71432"
