"""The HTTP API in process (TestClient, the engine thread running): shapes, errors, tenancy, metrics."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from inprocess import metrics, serving

from kvmem.engine.llm import LLM
from kvmem.model.loader import LoadedModel
from kvmem.server.loop import EngineLoop
from tiny_models import tiny_llama

PROMPT = "The harbour town woke early; fishing boats left before dawn. " * 3  # 183 byte tokens


def test_completion_is_llm_generate_with_openai_usage(
    server: tuple[TestClient, EngineLoop], llama: LoadedModel
) -> None:
    client, _ = server
    r = client.post(
        "/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    expected = LLM(llama).generate(PROMPT, max_new_tokens=12)
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == expected.text
    assert body["choices"][0]["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(llama.tokenizer(PROMPT)["input_ids"])
    assert usage["completion_tokens"] == 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + 12


def test_a_repeated_prompt_reports_its_cached_tokens(server: tuple[TestClient, EngineLoop]) -> None:
    client, _ = server
    body = {"prompt": "Another town, another tide. " * 6, "max_tokens": 2, "temperature": 0}
    first = client.post("/v1/completions", json=body).json()["usage"]
    second = client.post("/v1/completions", json=body).json()["usage"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    # every full 64-token block of the prompt but the one holding its last token
    assert second["prompt_tokens_details"]["cached_tokens"] == (first["prompt_tokens"] - 1) // 64 * 64 > 0


def test_stream_pieces_join_to_the_completion_and_end_with_usage(
    server: tuple[TestClient, EngineLoop],
) -> None:
    client, _ = server
    body = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=stream) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_chat_stream_starts_with_the_role_and_joins_to_the_answer(
    server: tuple[TestClient, EngineLoop],
) -> None:
    client, _ = server
    body = {
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_completion_tokens": 8,
        "temperature": 0,
    }
    answer = client.post("/v1/chat/completions", json=body).json()
    assert answer["object"] == "chat.completion"
    text = answer["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == text
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_models_health_and_metrics(server: tuple[TestClient, EngineLoop]) -> None:
    client, loop = server
    assert client.get("/health").json() == {"status": "ok"}
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny"]
    client.post("/v1/completions", json={"prompt": "count me", "max_tokens": 3})
    m = metrics(client)
    assert m["kvmem_kv_budget_bytes"] == 2**20
    assert m["kvmem_kv_bytes{state=used}"] == loop.engine.pool.bytes_used
    assert m["kvmem_kv_bytes_peak"] <= 2**20
    assert m["kvmem_requests{state=running}"] == 0
    assert m["kvmem_generated_tokens_total"] >= 3
    assert m["kvmem_ttft_seconds_count"] >= 1


# 20 malformed or hostile bodies: each a 4xx in OpenAI's error shape, and the server goes on
HOSTILE: list[tuple[str, object, int]] = [
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", b'{"prompt": "\xff\xfe invalid utf-8"}', 400),
    ("/v1/completions", b"[1, 2, 3]", 400),
    ("/v1/completions", {"model": "tiny"}, 400),
    ("/v1/completions", {"prompt": 123}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": -5}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**12}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": "lots"}, 400),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400),
    ("/v1/completions", {"prompt": "x", "top_p": 5}, 400),
    ("/v1/completions", {"prompt": "x", "kv_policy": "no-such-policy"}, 400),
    ("/v1/completions", {"prompt": "x", "kv_budget": "-3MiB", "kv_policy": "snapkv"}, 400),
    ("/v1/completions", {"prompt": "x", "n": 3}, 400),
    ("/v1/completions", {"prompt": "x", "stop": ["s"] * 100}, 400),
    ("/v1/completions", {"prompt": [999_999]}, 400),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404),
    ("/v1/completions", {"prompt": "x" * 10 * 2**20}, 413),
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": "maybe"}, 400),
]


@pytest.mark.parametrize(("path", "body", "status"), HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_bodies_get_a_4xx_in_openai_shape(
    server: tuple[TestClient, EngineLoop], path: str, body: object, status: int
) -> None:
    client, loop = server
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    ok = client.post("/v1/completions", json={"prompt": "still here?", "max_tokens": 2})
    assert ok.status_code == 200
    assert loop.in_flight == 0


# what a newcomer gets wrong first: each message says what and where, param names the field or is null
BAD_BODIES: list[tuple[bytes, dict[str, str], str, str | None]] = [
    (b'{"prompt": "x", "max_tokens": 3,}', {}, "request body is not valid JSON: Expecting", None),
    (b"{not json", {}, "request body is not valid JSON: Expecting property name", None),
    (b'{"prompt": "\xff"}', {}, "request body is not valid JSON: 'utf-8' codec can't decode", None),
    (b'{"prompt": "x"}', {"content-type": "application/x-www-form-urlencoded"}, "request body must", None),
    (b"[1, 2]", {}, "request body: Input should be a valid dictionary", None),
    (b'{"model": "tiny"}', {}, "prompt: Field required", "prompt"),
    (
        b'{"prompt": "x", "max_tokens": "lots"}',
        {},
        "max_tokens: Input should be a valid integer",
        "max_tokens",
    ),
]


@pytest.mark.parametrize(("body", "headers", "message", "param"), BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_bad_bodies_say_what_is_wrong_and_where(
    server: tuple[TestClient, EngineLoop],
    body: bytes,
    headers: dict[str, str],
    message: str,
    param: str | None,
) -> None:
    client, _ = server
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json", **headers})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["message"].startswith(message), error
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_a_malformed_json_body_says_where_it_breaks(server: tuple[TestClient, EngineLoop]) -> None:
    client, _ = server
    r = client.post(
        "/v1/completions", content=b'{"prompt": "x",,}', headers={"content-type": "application/json"}
    )
    assert r.json()["error"]["message"] == (
        "request body is not valid JSON: Expecting property name enclosed in double quotes: "
        "line 1 column 16 (char 15)"
    )


def test_requests_running_past_the_drain_timeout_end_with_an_error() -> None:
    # 4,000 new tokens cannot finish before the drain cuts them; the stream ends with an error, then [DONE]
    long = tiny_llama(context=4096)
    with serving(long, kv_budget="4MiB") as (client, loop):
        body = {"prompt": "a", "max_tokens": 4000, "ignore_eos": True}

        def stream() -> list[str]:
            with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                return [line for line in r.iter_lines() if line]

        with ThreadPoolExecutor(2) as pool:
            plain = pool.submit(client.post, "/v1/completions", json=body)
            streamed = pool.submit(stream)
            deadline = time.monotonic() + 30
            while loop.in_flight < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            loop.begin_drain(0.0)
            answer, events = plain.result(timeout=60), streamed.result(timeout=60)
        assert answer.status_code == 503
        assert answer.json()["error"]["code"] == "draining"
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error == answer.json()["error"]
        assert error["message"] == (
            "the server is shutting down: this request was cut when the drain timeout (0 s) passed"
        )
        assert metrics(client)["kvmem_requests_finished_total{reason=abort}"] == 2
        assert loop.engine.pool.bytes_used == 0


def test_a_request_that_could_never_fit_gets_400_with_the_numbers(llama: LoadedModel) -> None:
    with serving(llama, kv_budget="64KiB") as (client, _):
        r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["code"] == "kv_budget_exceeded"
        assert "KiB" in error["message"] and "64.00 KiB" in error["message"]
        assert metrics(client)["kvmem_requests_refused_total{reason=kv_budget}"] == 1


def test_chat_without_a_limit_runs_as_far_as_the_budget_could_hold(llama: LoadedModel) -> None:
    # the context leaves ~230 new tokens; 64 KiB holds 128 tokens: the answer is cut to fit
    with serving(llama, kv_budget="64KiB") as (client, _):
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["total_tokens"] == 128 + 1  # the last token is sampled, never stored
        assert metrics(client)["kvmem_kv_bytes_peak"] <= 64 * 2**10


def test_api_keys_and_tenant_isolation(llama: LoadedModel) -> None:
    serve = {"api_keys": ("key-a", "key-b"), "isolate_tenants": True}
    with serving(llama, serve, kv_budget="1MiB", prefix_cache=True, prefill_chunk=64) as (client, _):
        body = {"prompt": PROMPT, "max_tokens": 2}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert (
            client.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"}).status_code
            == 401
        )
        assert client.get("/v1/models").status_code == 401
        assert client.get("/health").status_code == 200  # health and metrics stay open

        def cached(key: str, salt: str | None = None) -> int:
            extra = {} if salt is None else {"cache_salt": salt}
            r = client.post(
                "/v1/completions", json={**body, **extra}, headers={"Authorization": f"Bearer {key}"}
            )
            assert r.status_code == 200, r.text
            return int(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])

        assert cached("key-a") == 0
        assert cached("key-a") > 0
        assert cached("key-b") == 0  # the same prompt, another tenant: nothing adopted
        assert cached("key-a", salt="project-x") == 0  # a salt of the request's own, within the tenant
        assert cached("key-a", salt="project-x") > 0


def test_a_full_queue_answers_429_with_retry_after(llama: LoadedModel) -> None:
    with serving(llama, {"max_waiting": 0}, max_num_seqs=1, max_batch_tokens=64) as (client, loop):
        long = threading.Thread(
            target=client.post, args=("/v1/completions",), kwargs={"json": {"prompt": "a", "max_tokens": 200}}
        )
        long.start()
        deadline = time.monotonic() + 30
        while loop.in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = client.post("/v1/completions", json={"prompt": "b", "max_tokens": 2})
        long.join(timeout=60)
        assert r.status_code == 429
        assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
        assert client.post("/v1/completions", json={"prompt": "b", "max_tokens": 2}).status_code == 200
