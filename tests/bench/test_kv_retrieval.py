from __future__ import annotations

import json

import pytest

from kvmem.bench.kv_retrieval import KVRetrieval
from kvmem.bench.tokens import Tokenizer


@pytest.mark.parametrize("depth", [0.0, 0.4, 1.0])
def test_the_asked_pair_sits_at_depth_in_valid_json(words: Tokenizer, depth: float) -> None:
    context = KVRetrieval(depth=depth, num_questions=3).make_context(words, 3000, seed=6)
    body = context.text[context.text.index("{") : context.text.rindex("}") + 1]
    pairs = json.loads(body)
    keys = list(pairs)
    assert len(keys) == context.meta["pairs"]
    for ex in context.examples:
        key, (value,) = ex.meta["key"], ex.gold
        assert pairs[key] == value and ex.context.count(value) == 1
        assert ex.answer == f' "{value}"' and ex.question.endswith(f'with key "{key}" is')
        assert keys.index(key) == ex.meta["pair_index"]
    assert keys.index(context.examples[0].meta["key"]) == int(depth * (len(keys) - 1) + 0.5)
    assert len({ex.meta["key"] for ex in context.examples}) == 3
