"""Two real vLLM CPU servers (``.venv-vllm``, one after the other) sharing one real Redis through
kvmem's connector: the second loads what the first computed — the same greedy tokens, a fraction
of the time to first token — another tenant's salt matches nothing, and a damaged, truncated or
foreign block, or Redis killed, is recomputed with identical tokens; no request fails.

``make test`` builds ``.venv-vllm`` (``make vllm-venv``); run alone, these tests skip without it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from vllm_server import BLOCK, VLLM_READY, VLLMServer, connector_config

from kvmem.model.dtype import resolve_dtype
from kvmem.model.loader import resolve_model_folder
from kvmem.tiers import blockcodec
from redis_server import RedisServer, free_port

pytestmark = [
    pytest.mark.real,  # SmolLM2 in real servers: `make test-fast` skips them
    pytest.mark.skipif(
        not VLLM_READY.exists(), reason="no .venv-vllm with kvmem in it: `make vllm-venv` builds it"
    ),
]

NEW = 16  # tokens generated per request
LONG = 2048  # the prompt whose load is timed
SHORT = 5 * BLOCK  # the prompts that are damaged: five blocks


@dataclass
class Stored:
    """What the first server computed: each prompt's tokens, text, and its blocks in Redis by depth."""

    redis: RedisServer
    folder: Path
    dtype: str
    prompts: dict[str, list[int]]
    texts: dict[str, str] = field(default_factory=dict)
    keys: dict[str, dict[int, bytes]] = field(default_factory=dict)  # prompt -> depth -> Redis key


def prompts(folder: Path) -> dict[str, list[int]]:
    import pydoc_data.topics

    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(folder))(" ".join(pydoc_data.topics.topics.values()))["input_ids"]
    out, at = {}, 1000
    for name, n in [("long", LONG), ("other", LONG), ("flip", SHORT), ("truncate", SHORT)]:
        out[name], at = ids[at : at + n], at + n + 500  # apart: no two share a block
    for name in ("foreign", "killed"):
        out[name], at = ids[at : at + SHORT], at + SHORT + 500
    return out


def keys_by_depth(client: redis.Redis, before: set[bytes]) -> dict[int, bytes]:
    found = {}
    for name in set(client.keys("kvmem:vllm:*")) - before:
        header = blockcodec.header(client.get(name))  # type: ignore[arg-type]
        assert header is not None
        found[int(header["depth"])] = name
    return found


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stored]:
    folder = resolve_model_folder("smollm2-135m")
    dtype = str(resolve_dtype("auto")).removeprefix("torch.")  # bfloat16 only where the CPU has it
    tmp = tmp_path_factory.mktemp("vllm")
    with RedisServer(tmp) as server:
        result = Stored(server, folder, dtype, prompts(folder))
        with VLLMServer(folder, free_port(), tmp / "first.log", connector_config(server.url), dtype) as first:
            first.wait_ready()
            for name in ("long", "flip", "truncate", "foreign", "killed"):
                before = set(server.client.keys("*"))
                body, _ = first.complete(result.prompts[name], NEW)
                assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
                result.texts[name] = body["text"]
                result.keys[name] = keys_by_depth(server.client, before)
        yield result


@pytest.fixture(scope="module")
def second(stored: Stored, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    """The second server, started after the first stopped, with three stored blocks damaged."""
    client = stored.redis.client
    flip = stored.keys["flip"][2]
    data = client.get(flip)
    assert isinstance(data, bytes)
    client.set(flip, data[:-100] + bytes([data[-100] ^ 0x01]) + data[-99:])
    truncated = stored.keys["truncate"][2]
    client.set(truncated, client.getrange(truncated, 0, 20_000))
    foreign = stored.keys["foreign"][2]
    found = blockcodec.decode(bytes.fromhex(foreign.decode().rsplit(":", 1)[1]), client.get(foreign))  # type: ignore[arg-type]
    assert found is not None
    tensors, header = found
    # the header's model differs; its key, checksum and shape are valid
    client.set(foreign, blockcodec.encode(bytes.fromhex(header["key"]), tensors, {**header, "model": "x"}))
    log = tmp_path_factory.mktemp("vllm2") / "second.log"
    transfer = connector_config(stored.redis.url)
    with VLLMServer(stored.folder, free_port(), log, transfer, stored.dtype) as server:
        server.wait_ready()
        yield server


def cached(body: dict) -> int:
    return int(body["usage"]["prompt_tokens_details"]["cached_tokens"])


def test_the_second_server_loads_the_first_servers_prompt(stored: Stored, second: VLLMServer) -> None:
    computed, ttft_computed = second.complete(stored.prompts["other"], NEW)  # same length, not stored
    assert cached(computed) == 0
    loaded, ttft_loaded = second.complete(stored.prompts["long"], NEW)
    assert cached(loaded) == (LONG - 1) // BLOCK * BLOCK  # every full block but the last token's
    assert loaded["text"] == stored.texts["long"]  # greedy tokens identical to computing them
    assert ttft_loaded * 3 <= ttft_computed, (ttft_loaded, ttft_computed)


def test_another_salt_matches_nothing_in_the_tier(stored: Stored, second: VLLMServer) -> None:
    body, _ = second.complete(stored.prompts["long"], NEW, cache_salt="another-tenant")
    assert cached(body) == 0
    assert body["text"] == stored.texts["long"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign"])
def test_a_damaged_block_is_recomputed(stored: Stored, second: VLLMServer, damage: str) -> None:
    before = second.log_size()
    body, _ = second.complete(stored.prompts[damage], NEW)
    assert body["text"] == stored.texts[damage]  # identical tokens, no failed request
    time.sleep(0.5)  # the worker's and engine's lines reach the log through the API server
    log = second.log_since(before)  # what this request added
    # the miss is counted: kvmem reports the block, vLLM recomputes from it
    assert re.search(r"kvmem: loaded 3 of 4 blocks .* \(1 failed: recomputed\)", log), log
    assert "Recovered from KV load failure: 1 request(s) rescheduled (256 tokens affected)" in log
    # the damaged value was deleted and the recomputed block stored again, with this model's header
    header = blockcodec.header(stored.redis.client.get(stored.keys[damage][2]))  # type: ignore[arg-type]
    assert header is not None and header["model"] != "x"


def test_redis_killed_is_a_recomputation_not_a_failure(stored: Stored, second: VLLMServer) -> None:
    stored.redis.kill()
    body, _ = second.complete(stored.prompts["killed"], NEW)
    assert cached(body) == 0
    assert body["text"] == stored.texts["killed"]
    again, _ = second.complete(stored.prompts["long"], NEW)  # vLLM's own prefix cache still serves
    assert again["text"] == stored.texts["long"]
