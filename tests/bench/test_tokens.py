from __future__ import annotations

import pytest

from kvmem.bench.tokens import Tokenizer, largest_fitting, length_fn


def test_length_fn_takes_a_tokenizer_or_a_function(words: Tokenizer) -> None:
    assert length_fn(words)("a bb  ccc\n") == 3
    assert length_fn(len)("a bb") == 4


@pytest.mark.parametrize("threshold", [0, 1, 2, 7, 64, 1000])
def test_largest_fitting_finds_the_last_true(threshold: int) -> None:
    calls: list[int] = []

    def fits(n: int) -> bool:
        calls.append(n)
        return n <= threshold

    assert largest_fitting(fits) == threshold
    assert len(calls) <= 2 * threshold.bit_length() + 3


def test_largest_fitting_respects_the_limit_and_reports_nothing_fitting() -> None:
    assert largest_fitting(lambda n: True, limit=5) == 5
    assert largest_fitting(lambda n: n <= 3, limit=10) == 3
    assert largest_fitting(lambda n: False) is None
