"""Pass key, multi-key and multi-value: needles at the requested depth, every needle asked."""

from __future__ import annotations

import pytest

from kvmem.bench.example import Example
from kvmem.bench.multikey import MultiKey
from kvmem.bench.multivalue import MultiValue
from kvmem.bench.passkey import Passkey
from kvmem.bench.tokens import Tokenizer

DEPTHS = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]


def haystack_depth(ex: Example, offset: int) -> float:
    """Where ``offset`` sits between the end of the intro and the end of the context."""
    start = ex.context.index("\n\n") + 2
    return (offset - start) / (len(ex.context.rstrip()) - start)


@pytest.mark.parametrize("depth", DEPTHS)
def test_passkey_sits_at_the_requested_depth(words: Tokenizer, depth: float) -> None:
    ex = Passkey(depth=depth).generate(words, 4000, seed=11)
    (key,) = ex.gold
    offset = ex.context.index(f"The pass key is {key}. Remember it.")
    assert ex.context.count(key) == 1 and ex.meta["answer_offset"] == ex.context.index(key)
    assert abs(haystack_depth(ex, offset) - depth) < 0.02
    assert abs(offset / len(ex.prompt) - depth) < 0.05  # and as a fraction of the whole prompt
    assert ex.prompt.endswith("Answer: The pass key is") and ex.answer == f" {key}"


def test_passkey_digits_and_bad_depth() -> None:
    class Chars:
        def encode(self, text: str) -> list[int]:
            return list(map(ord, text))

    assert len(Passkey(digits=9).generate(Chars(), 3000, seed=0).gold[0]) == 9
    with pytest.raises(ValueError, match="depth"):
        Passkey(depth=1.2)


@pytest.mark.parametrize("depth", DEPTHS)
def test_multikey_asks_every_key_first_the_one_at_depth(words: Tokenizer, depth: float) -> None:
    context = MultiKey(depth=depth, num_keys=4).make_context(words, 4000, seed=2)
    examples = context.examples
    assert len(examples) == 4 and len({ex.gold for ex in examples}) == 4
    for ex in examples:
        key, (value,) = ex.meta["key"], ex.gold
        assert isinstance(key, str)
        needle = f"The special magic number for {key} is {value}."
        assert ex.context.count(needle) == 1 and ex.context.count(value) == 1
        assert ex.question.endswith(f"The special magic number for {key} is")
        assert abs(haystack_depth(ex, ex.context.index(needle)) - float(str(ex.meta["depth"]))) < 0.02
    assert examples[0].meta["depth"] == depth
    assert MultiKey(depth=depth).generate(words, 4000, seed=2) == examples[0]


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_multivalue_values_spread_from_depth(words: Tokenizer, depth: float) -> None:
    ex = MultiValue(depth=depth, num_values=4).generate(words, 4000, seed=9)
    key = ex.meta["key"]
    offsets = [ex.context.index(f"One of the special magic numbers for {key} is {v}.") for v in ex.gold]
    assert offsets == sorted(offsets)  # gold in order of appearance
    found = sorted(haystack_depth(ex, o) for o in offsets)
    wanted = sorted((depth + i / 4) % 1.0 if i else depth for i in range(4))
    assert all(abs(f - w) < 0.02 for f, w in zip(found, wanted))
    assert ex.answer == " " + ", ".join(ex.gold)
    assert ex.question.endswith(f"The special magic numbers for {key} are:")


def test_multivalue_with_several_keys_asks_each(words: Tokenizer) -> None:
    context = MultiValue(num_keys=3, num_values=2).make_context(words, 3000, seed=1)
    assert len(context.questions) == 3
    every_value = [v for q in context.questions for v in q.gold]
    assert len(set(every_value)) == 6
    for q in context.questions:
        for v in q.gold:
            assert context.text.count(f"numbers for {q.meta['key']} is {v}.") == 1
