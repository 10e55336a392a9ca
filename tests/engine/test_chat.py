"""Chat turns append to the session's KV state and equal a from-scratch run of the same tokens."""

import pytest

from kvmem.engine.chat import PLAIN_STOP
from kvmem.engine.llm import LLM
from kvmem.model.loader import LoadedModel

QUESTIONS = ["What is the capital of France?", "And of Germany?", "Which one is larger?"]


def check_chat_equals_from_scratch(loaded: LoadedModel, max_new_tokens: int) -> None:
    llm = LLM(loaded, block_size=4)
    session = llm.chat()
    cached_before = 0
    for question in QUESTIONS:
        result = session.send(question, max_new_tokens=max_new_tokens)
        tokens = session.sequence.token_ids
        prompt = tokens[: len(tokens) - len(result.token_ids)]
        # only the new turn is computed: everything before it was cached
        assert result.stats.tokens_prefilled == len(prompt) - cached_before
        assert result.stats.prompt_tokens == len(prompt)
        cached_before = len(tokens) - 1
        stop = None if loaded.has_chat_template else [PLAIN_STOP]
        fresh = LLM(loaded, block_size=4).generate(prompt, max_new_tokens=max_new_tokens, stop=stop)
        assert result.token_ids == fresh.token_ids
        assert session.kv_bytes == llm.pool.bytes_used == llm.pool.physical_nbytes()
    assert session.turns == 3
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 3
    session.close()
    assert llm.pool.bytes_used == 0
    llm.pool.check_integrity()


def test_chat_with_template(llama: LoadedModel) -> None:
    check_chat_equals_from_scratch(llama, 12)


def test_chat_plain_format(gemma: LoadedModel) -> None:
    check_chat_equals_from_scratch(gemma, 12)


@pytest.mark.real
def test_chat_real_models(real: LoadedModel) -> None:
    check_chat_equals_from_scratch(real, 16)


def test_plain_format_text(gemma: LoadedModel) -> None:
    llm = LLM(gemma)
    with llm.chat(system="Be brief.") as session:
        session.send("Hello", max_new_tokens=4)
        text = session.render(session.messages + [{"role": "user", "content": "Bye"}], True)
    assert text.startswith("Be brief.\nUser: Hello\nAssistant:")
    assert text.endswith("\nUser: Bye\nAssistant:")
    assert llm.pool.bytes_used == 0


def test_refused_turn_leaves_the_session_usable(llama: LoadedModel) -> None:
    from kvmem.errors import KVBudgetError

    llm = LLM(llama, kv_budget="48KiB", block_size=4)
    with llm.chat() as session:
        first = session.send("Hi", max_new_tokens=4)
        tokens, messages = list(session.sequence.token_ids), list(session.messages)
        with pytest.raises(KVBudgetError):
            session.send("x" * 150, max_new_tokens=4)
        assert session.sequence.token_ids == tokens and session.messages == messages
        second = session.send("Ok", max_new_tokens=4)
        assert second.stats.prompt_tokens > first.stats.prompt_tokens
        assert llm.pool.bytes_used <= 48 * 1024
    llm.pool.check_integrity()
