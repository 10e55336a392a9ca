"""``RedisTier`` against a real redis-server on 127.0.0.1: exact round trips, damage and foreign
blocks as misses, TTL, and a dead or stalled server as a miss rather than an error or a stall."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from kvmem.bench.redis_server import redis_server
from kvmem.tiers import blockcodec
from kvmem.tiers.redis import InvalidRedisURLError, RedisTier


def block(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.0": torch.randn(2, 3, 16, 8, generator=g).to(torch.bfloat16),
        "layer.1": torch.randint(0, 256, (640,), generator=g, dtype=torch.uint8),
    }


def key(i: int) -> bytes:
    return bytes([i]) * 16


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]) for n in a)


def test_round_trip_is_exact_and_pipelined(redis_url: str) -> None:
    tier = RedisTier(redis_url)
    written = tier.put_many([(key(i), block(i), {"model": "m"}) for i in range(40)])  # two batches
    assert written == tier.stats.bytes_written > 0 and tier.stats.writes == 40
    found = tier.get_many([key(i) for i in range(45)], {"model": "m"})
    assert [f is not None for f in found] == [True] * 40 + [False] * 5
    for i in range(40):
        tensors, meta = found[i]  # type: ignore[misc]
        assert same(tensors, block(i)) and meta["model"] == "m" and meta["key"] == key(i).hex()
    assert (tier.stats.hits, tier.stats.misses, tier.stats.corrupt) == (40, 5, 0)
    assert tier.contains_many([key(0), key(41)]) == [True, False]
    assert 0 < tier.client.ttl(tier.name(key(0))) <= tier.ttl_s  # type: ignore[operator]


@pytest.mark.parametrize("damage", ["flip", "truncate", "other-key", "other-model", "garbage"])
def test_a_damaged_or_foreign_value_is_a_counted_miss_and_deleted(redis_url: str, damage: str) -> None:
    tier = RedisTier(redis_url)
    tier.put(key(1), block(1), {"model": "m"})
    tier.put(key(2), block(2), {"model": "m"})
    raw = redis.Redis.from_url(redis_url)
    data = raw.get(tier.name(key(1)))
    assert isinstance(data, bytes)
    if damage == "flip":
        i = len(data) - 5  # inside the tensor bytes
        bad = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]
    elif damage == "truncate":
        bad = data[: len(data) // 2]
    elif damage == "other-key":  # another block's (valid) bytes stored under this key
        other = raw.get(tier.name(key(2)))
        assert isinstance(other, bytes)
        bad = other
    elif damage == "other-model":
        bad = blockcodec.encode(key(1), block(1), {"model": "another model"})
    else:
        bad = b"\x00" * 64
    raw.set(tier.name(key(1)), bad)
    assert tier.get(key(1), {"model": "m"}) is None
    assert (tier.stats.corrupt, tier.stats.misses) == (1, 1)
    assert raw.exists(tier.name(key(1))) == 0  # removed: the next writer stores a good one
    assert tier.get(key(2), {"model": "m"}) is not None  # its neighbour is untouched


def test_bad_urls_and_settings_are_refused() -> None:
    for url in ("http://127.0.0.1:6379", "127.0.0.1:6379", "redis://"):
        with pytest.raises(InvalidRedisURLError):
            RedisTier(url)
    with pytest.raises(ValueError, match="TTL"):
        RedisTier("redis://127.0.0.1:6379/0", ttl_s=0)


def test_a_dead_server_is_a_miss_then_the_tier_rests(tmp_path: Path) -> None:
    with redis_server(tmp_path) as server:
        tier = RedisTier(server.url, timeout_s=0.5, retry_after_s=60)
        tier.put(key(1), block(1))
        server.kill()
    assert tier.get(key(1)) is None  # refused: a miss, no exception
    assert tier.stats.errors == 1
    assert tier.put(key(2), block(2)) == 0  # dropped while resting, not retried per block
    assert tier.get_many([key(1), key(2)]) == [None, None]
    assert tier.stats.errors == 1 and tier.stats.skipped == 2
    assert not tier.available


@pytest.fixture
def stalled_server() -> Iterator[str]:
    """A TCP server that accepts connections and never answers (a hung Redis)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    listener.close()


def test_a_stalled_server_times_out_into_a_miss(stalled_server: str) -> None:
    tier = RedisTier(stalled_server, timeout_s=0.2, retry_after_s=60)
    assert tier.get(key(1)) is None
    assert tier.stats.errors == 1  # one timeout; the calls after it do not wait again
    assert tier.put(key(1), block(1)) == 0 and tier.stats.skipped == 1


def test_maxmemory_eviction_is_left_to_redis(tmp_path: Path) -> None:
    with redis_server(tmp_path, maxmemory="2mb") as server:
        tier = RedisTier(server.url)
        for i in range(60):  # 100 KB each: 6 MB into 2 MB
            big = {"layer.0": torch.full((100_000,), i, dtype=torch.uint8)}
            tier.put(key(i), big)
        found = tier.get_many([key(i) for i in range(60)])
    assert tier.stats.errors == 0  # no write refused: Redis evicted instead
    kept = [i for i, f in enumerate(found) if f is not None]
    assert 0 < len(kept) < 60 and kept[-1] == 59  # the newest stay, the oldest went
    for i in kept:
        assert torch.equal(found[i][0]["layer.0"], torch.full((100_000,), i, dtype=torch.uint8))  # type: ignore[index]


def test_an_unreachable_server_is_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tier = RedisTier(f"redis://:secret@127.0.0.1:{port}/0", timeout_s=0.5, retry_after_s=0)
    for i in range(3):
        assert tier.get(key(i)) is None
        assert tier.put(key(i), block(i)) == 0
    assert tier.stats.errors == 6 and tier.failing
    warned = [r.getMessage() for r in caplog.records if r.name == "kvmem.tiers"]
    assert len(warned) == 1
    assert warned[0].startswith(f"Redis cache redis://:***@127.0.0.1:{port}/0 cannot be reached (")
    assert "refused" in warned[0] and "secret" not in warned[0]
