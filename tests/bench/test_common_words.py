from __future__ import annotations

import re
from collections import Counter

import pytest

from kvmem.bench.common_words import CommonWords
from kvmem.bench.task import TaskLengthError
from kvmem.bench.tokens import Tokenizer


@pytest.mark.parametrize(("length", "freq"), [(300, 6), (700, 10), (1500, 30), (30_000, 30)])
def test_the_gold_words_are_the_most_frequent(words: Tokenizer, length: int, freq: int) -> None:
    ex = CommonWords(top_n=10).generate(words, length, seed=3)
    listing = re.findall(r"(\d+)\. ([a-z]+)", ex.context)
    assert [int(i) for i, _ in listing] == list(range(1, len(listing) + 1))
    counts = Counter(w for _, w in listing)
    assert ex.meta["common_freq_used"] == freq
    assert len(ex.gold) == 10 and all(counts[w] == freq for w in ex.gold)
    assert max(c for w, c in counts.items() if w not in ex.gold) < freq
    assert sum(counts[w] for w in ex.gold) <= len(listing) / 2
    assert ex.question.endswith("The 10 most common words in the list are:")


def test_a_fixed_frequency_is_kept_or_refused(words: Tokenizer) -> None:
    ex = CommonWords(top_n=5, common_freq=12, rare_freq=2).generate(words, 1000, seed=0)
    assert Counter(re.findall(r"\d+\. ([a-z]+)", ex.context))[ex.gold[0]] == 12
    with pytest.raises(TaskLengthError):
        CommonWords(common_freq=30).generate(words, 500, seed=0)
    with pytest.raises(ValueError):
        CommonWords(common_freq=3, rare_freq=3)
