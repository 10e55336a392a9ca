"""The official ``openai`` client against a real ``kvmem serve`` of SmolLM2: the same greedy text as
``LLM.generate`` for completions, chat completions and streamed chat completions."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from process import ServerProcess

from kvmem.engine.llm import LLM
from kvmem.model.loader import LoadedModel
from kvmem.server.app import chat_ids

pytestmark = pytest.mark.real

MODEL = "smollm2-135m"


def test_openai_client_gets_what_llm_generate_gives(smollm2: LoadedModel, tmp_path: Path) -> None:
    llm = LLM(smollm2)
    args = [
        "--model",
        MODEL,
        "--dtype",
        "float32",
        "--kv-budget",
        "128MiB",
        "--prefix-cache",
        "--prefill-chunk",  # a block: the 124-token prompt reuses a block (exact reuse ends on a chunk)
        "64",
        "--api-key",
        "sk-test",
    ]
    with ServerProcess(args, tmp_path / "server.log") as server:
        server.wait_ready()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-test", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()] == [MODEL]

        prompt = "The three primary colours are"
        completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
        assert completion.choices[0].text == llm.generate(prompt, max_new_tokens=20).text

        system = "You are a geography tutor. " + "Answer briefly, in one sentence, and name the country. " * 8
        messages = [
            {"role": "system", "content": system},  # the conversation spans more than one 64-token block
            {"role": "user", "content": "What is the capital of France?"},
        ]
        expected = llm.generate(chat_ids(smollm2, messages), max_new_tokens=32).text
        chat = client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_completion_tokens=32,
            temperature=0,  # type: ignore[arg-type]
        )
        assert chat.choices[0].message.content == expected and expected.strip()
        assert chat.usage is not None

        stream = client.chat.completions.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            max_completion_tokens=32,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, usage = [], None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
        assert "".join(pieces) == expected
        assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens
        assert usage.prompt_tokens_details is not None
        assert usage.prompt_tokens_details.cached_tokens > 0  # the same conversation a second time

        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=10**9)
