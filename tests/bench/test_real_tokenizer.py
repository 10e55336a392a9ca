"""With SmolLM2's own tokenizer every task fits its length closely (no generation, so still quick)."""

from __future__ import annotations

import pytest

from kvmem.bench import TASKS, make_task
from kvmem.model.loader import LoadedModel


@pytest.mark.real
def test_every_task_fits_the_real_tokenizer(smollm2: LoadedModel) -> None:
    tokenizer = smollm2.tokenizer
    for name in TASKS:
        context = make_task(name).make_context(tokenizer, 2048, seed=0)
        for ex in context.examples:
            tokens = len(tokenizer.encode(ex.prompt))
            assert 2048 - 100 <= tokens <= 2048, (name, tokens)
            assert len(tokenizer.encode(ex.prompt + ex.answer)) > tokens
