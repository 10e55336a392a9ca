"""One real vLLM CPU server (``.venv-vllm``), started once, with its own prefix cache off, on a real
Redis through kvmem's connector: a prompt asked again is loaded from Redis — the same greedy tokens,
a fraction of the time to first token — under keys that another process (vLLM's hashing in a fresh
interpreter) derives alike, so every server on the same Redis finds them; another tenant's salt
matches nothing, and a damaged, truncated or foreign block, or Redis killed, is recomputed with
identical tokens; no request fails.

``make test`` builds ``.venv-vllm`` (``make vllm-venv``); run alone, these tests skip without it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis
from vllm_server import BLOCK, VLLM_READY, VLLMServer, block_hashes

from kvmem.bench.redis_server import RedisServer, free_port
from kvmem.bench.serving import token_slices
from kvmem.model.dtype import resolve_dtype
from kvmem.model.loader import LoadedModel, load_model, resolve_model_folder
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
    """The server after its first pass: each prompt's tokens, text, and its blocks in Redis by depth."""

    redis: RedisServer
    server: VLLMServer
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
    """Every prompt but "other" computed once and stored in Redis; then three stored blocks damaged."""
    folder = resolve_model_folder("smollm2-135m")
    dtype = str(resolve_dtype("auto")).removeprefix("torch.")  # bfloat16 only where the CPU has it
    tmp = tmp_path_factory.mktemp("vllm")
    with RedisServer(tmp) as redis_server:
        loaded = load_model("smollm2-135m")
        # vLLM's own prefix cache off: whatever a repeated prompt reuses comes through the connector
        with VLLMServer(
            folder, loaded.spec, free_port(), tmp / "vllm.log", redis_server.url, dtype, prefix_cache=False
        ) as server:
            server.wait_ready()
            result = Stored(redis_server, server, prompts(loaded))
            for name in ("long", "flip", "truncate", "foreign", "killed"):
                before = set(redis_server.client.keys("*"))
                done = server.complete(result.prompts[name], NEW)
                assert done.cached_tokens == 0
                result.texts[name] = done.text
                result.keys[name] = keys_by_depth(redis_server.client, before)
            damage_three_blocks(redis_server.client, result.keys)
            yield result


def damage_three_blocks(client: redis.Redis, keys: dict[str, dict[int, bytes]]) -> None:
    """The third block of "flip" gets a flipped bit, of "truncate" loses its end, of "foreign" names
    another model (its key, checksum and shape valid)."""
    flip = keys["flip"][2]
    data = client.get(flip)
    assert isinstance(data, bytes)
    client.set(flip, data[:-100] + bytes([data[-100] ^ 0x01]) + data[-99:])
    truncated = keys["truncate"][2]
    client.set(truncated, client.getrange(truncated, 0, 20_000))
    foreign = keys["foreign"][2]
    found = blockcodec.decode(bytes.fromhex(foreign.decode().rsplit(":", 1)[1]), client.get(foreign))  # type: ignore[arg-type]
    assert found is not None
    tensors, header = found
    client.set(foreign, blockcodec.encode(bytes.fromhex(header["key"]), tensors, {**header, "model": "x"}))


def test_a_repeated_prompt_is_loaded_from_redis(stored: Stored) -> None:
    computed = stored.server.complete(stored.prompts["other"], NEW)  # the same length, not stored
    assert computed.cached_tokens == 0
    loaded = stored.server.complete(stored.prompts["long"], NEW)
    assert loaded.cached_tokens == (LONG - 1) // BLOCK * BLOCK  # every full block but the last token's
    assert loaded.text == stored.texts["long"]  # greedy tokens identical to computing them
    print(f"TTFT computed {computed.ttft_s:.2f} s, loaded from Redis {loaded.ttft_s:.2f} s")
    assert loaded.ttft_s * 3 <= computed.ttft_s, (loaded.ttft_s, computed.ttft_s)


def test_keys_are_the_same_in_every_process(stored: Stored) -> None:
    """The stored keys are vLLM's portable block hashes, as a fresh interpreter computes them: another
    server on this Redis (another process, another PYTHONHASHSEED) finds the same blocks."""
    hashes = block_hashes(stored.prompts["long"])
    assert len(hashes) == LONG // BLOCK
    keys = stored.keys["long"]
    assert {depth: key.decode().rsplit(":", 1)[1] for depth, key in keys.items()} == dict(enumerate(hashes))


def test_another_salt_matches_nothing_in_the_tier(stored: Stored) -> None:
    salted = stored.server.complete(stored.prompts["long"], NEW, cache_salt="another-tenant")
    assert salted.cached_tokens == 0
    assert salted.text == stored.texts["long"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign"])
def test_a_damaged_block_is_recomputed(stored: Stored, damage: str) -> None:
    server = stored.server
    before = server.log_size()
    done = server.complete(stored.prompts[damage], NEW)
    assert done.text == stored.texts[damage]  # identical tokens, no failed request
    time.sleep(0.5)  # the worker's and engine's lines reach the log through the API server
    log = server.log_since(before)  # what this request added
    # the miss is counted: kvmem reports the block, vLLM recomputes from it
    assert re.search(r"kvmem: loaded 3 of 4 blocks .* \(1 failed: recomputed\)", log), log
    assert "Recovered from KV load failure: 1 request(s) rescheduled (256 tokens affected)" in log
    # the damaged value was deleted and the recomputed block stored again, with this model's header
    header = blockcodec.header(stored.redis.client.get(stored.keys[damage][2]))  # type: ignore[arg-type]
    assert header is not None and header["model"] != "x"


def test_redis_killed_is_a_recomputation_not_a_failure(stored: Stored) -> None:
    stored.redis.kill()
    done = stored.server.complete(stored.prompts["killed"], NEW)  # stored, but Redis is gone
    assert done.cached_tokens == 0
    assert done.text == stored.texts["killed"]
