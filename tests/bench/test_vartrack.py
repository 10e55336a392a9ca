from __future__ import annotations

import re

from kvmem.bench.tokens import Tokenizer
from kvmem.bench.vartrack import VarTrack


def test_chains_read_in_order_and_resolve_to_their_value(words: Tokenizer) -> None:
    context = VarTrack(num_chains=3, num_hops=4).make_context(words, 3000, seed=8)
    assignments = re.findall(r"VAR ([A-Z]{5}) = ([A-Z]{5}|[0-9]+)\.", context.text)
    assert len(assignments) == 15
    value_of: dict[str, str] = {}
    for var, source in assignments:  # one pass suffices when every chain reads in order
        value_of[var] = value_of[source] if source.isalpha() else source
    assert len(context.examples) == 3
    for ex in context.examples:
        value = str(ex.meta["value"])
        assert ex.context.count(value) == 1 and len(ex.gold) == 5
        assert [v for v, val in value_of.items() if val == value] == list(ex.gold)
        assert ex.question.endswith(f"assigned the value {value} are:")
