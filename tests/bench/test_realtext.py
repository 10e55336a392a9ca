from __future__ import annotations

from pydoc_data.topics import topics

from kvmem.bench.realtext import RealText
from kvmem.bench.tokens import Tokenizer


def test_context_and_continuation_are_consecutive_documentation(words: Tokenizer) -> None:
    ex = RealText(continuation_words=20).generate(words, 5000, seed=4)
    keys = sorted(topics)
    first = keys.index(str(ex.meta["topic"]))
    document = "".join("\n\n" + topics[k].strip() for k in keys[first:] + keys[:first]).lstrip()
    assert ex.question == "" and ex.prompt == ex.context
    assert document.startswith(ex.context + ex.answer)
    assert len(ex.answer.split()) == 20 and ex.answer[0].isspace() and not ex.context[-1].isspace()
