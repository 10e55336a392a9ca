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
from vllm_server import BLOCK, VLLM_READY, VLLMServer

from kvmem.bench.redis_server import RedisServer, free_port
from kvmem.bench.serving import token_slices
from kvmem.model.dtype import resolve_dtype
from kvmem.model.loader import LoadedModel, load_model, resolve_model_folder
from kvmem.model.spec import ModelSpec
from kvmem.tiers import blockcodec

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
    spec: ModelSpec
    dtype: str
    prompts: dict[str, list[int]]
    texts: dict[str, str] = field(default_factory=dict)
    keys: dict[str, dict[int, bytes]] = field(default_factory=dict)  # prompt -> depth -> Redis key


def prompts(loaded: LoadedModel) -> dict[str, list[int]]:
    """Distinct prompts (no two share a block): two of LONG tokens, four of SHORT."""
    slices = token_slices(loaded, 6, LONG)
    names = ["long", "other", "flip", "truncate", "foreign", "killed"]
    return {name: ids if i < 2 else ids[:SHORT] for i, (name, ids) in enumerate(zip(names, slices))}


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
        loaded = load_model("smollm2-135m")
        result = Stored(server, folder, loaded.spec, dtype, prompts(loaded))
        with VLLMServer(folder, result.spec, free_port(), tmp / "first.log", server.url, dtype) as first:
            first.wait_ready()
            for name in ("long", "flip", "truncate", "foreign", "killed"):
                before = set(server.client.keys("*"))
                done = first.complete(result.prompts[name], NEW)
                assert done.cached_tokens == 0
                result.texts[name] = done.text
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
    with VLLMServer(stored.folder, stored.spec, free_port(), log, stored.redis.url, stored.dtype) as server:
        server.wait_ready()
        yield server


def test_the_second_server_loads_the_first_servers_prompt(stored: Stored, second: VLLMServer) -> None:
    computed = second.complete(stored.prompts["other"], NEW)  # the same length, not stored
    assert computed.cached_tokens == 0
    loaded = second.complete(stored.prompts["long"], NEW)
    assert loaded.cached_tokens == (LONG - 1) // BLOCK * BLOCK  # every full block but the last token's
    assert loaded.text == stored.texts["long"]  # greedy tokens identical to computing them
    print(f"TTFT computed {computed.ttft_s:.2f} s, loaded from Redis {loaded.ttft_s:.2f} s")
    assert loaded.ttft_s * 3 <= computed.ttft_s, (loaded.ttft_s, computed.ttft_s)


def test_another_salt_matches_nothing_in_the_tier(stored: Stored, second: VLLMServer) -> None:
    salted = second.complete(stored.prompts["long"], NEW, cache_salt="another-tenant")
    assert salted.cached_tokens == 0
    assert salted.text == stored.texts["long"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign"])
def test_a_damaged_block_is_recomputed(stored: Stored, second: VLLMServer, damage: str) -> None:
    before = second.log_size()
    done = second.complete(stored.prompts[damage], NEW)
    assert done.text == stored.texts[damage]  # identical tokens, no failed request
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
    done = second.complete(stored.prompts["killed"], NEW)
    assert done.cached_tokens == 0
    assert done.text == stored.texts["killed"]
    again = second.complete(stored.prompts["long"], NEW)  # vLLM's own prefix cache still serves
    assert again.text == stored.texts["long"]
