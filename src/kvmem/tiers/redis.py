"""``RedisTier``: KV blocks in a Redis server that every kvmem (and vLLM) process pointing at it shares.

A value is one block in ``blockcodec``'s format (a header with the format version, the key, model
identity, dtype and a sha256 of the tensors), stored under ``<namespace><key hex>`` with a TTL;
what Redis evicts under its ``maxmemory`` policy is just a miss. Reads and writes of many blocks
go in one pipelined round trip (``get_many``, ``put_many``).

Redis is a cache here, never a dependency of a request: every call has a socket timeout, and an
error (refused, timed out, reset, out of memory) makes the call a miss or a dropped write, counted,
after which the tier stays off for ``retry_after_s`` so a dead server costs one timeout, not one
per block. The first failure is warned about, once, on the ``kvmem.tiers`` logger. A value that
does not decode as what was written under its key (truncated, flipped byte, another model's block)
is a counted miss and is deleted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlparse

import redis as redis_py
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from kvmem.errors import KVMemError
from kvmem.tiers import blockcodec

DEFAULT_TTL_S = 24 * 3600
DEFAULT_TIMEOUT_S = 1.0
NAMESPACE = "kvmem:block:"
_BATCH = 32  # blocks per pipelined round trip: bounds one reply's size (32 SmolLM2 bf16 blocks ~ 12 MB)

log = logging.getLogger("kvmem.tiers")
T = TypeVar("T")
Found = tuple[dict[str, torch.Tensor], dict[str, str]]


class InvalidRedisURLError(KVMemError, ValueError):
    """A Redis cache URL that is not ``redis://host:port/db`` (or ``rediss://``, ``unix://``)."""


@dataclass
class RedisStats:
    """What the tier did since it was opened (this process)."""

    hits: int = 0
    misses: int = 0
    corrupt: int = 0  # values that did not decode as what was written under their key: deleted
    writes: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    errors: int = 0  # calls that failed (refused, timed out): misses or dropped writes
    skipped: int = 0  # calls not made because the server failed within retry_after_s


def check_url(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss", "unix") or (parsed.scheme != "unix" and not parsed.hostname):
        raise InvalidRedisURLError(
            f"not a Redis URL: {url!r} (expected redis://HOST:PORT/DB, e.g. redis://127.0.0.1:6379/0)"
        )
    return url


def _without_password(url: str) -> str:
    """``url`` fit for a log line: ``redis://:secret@host/0`` as ``redis://:***@host/0``."""
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    return parsed._replace(netloc=parsed.netloc.replace(f":{parsed.password}@", ":***@", 1)).geturl()


class RedisTier:
    def __init__(
        self,
        url: str,
        ttl_s: float | None = DEFAULT_TTL_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retry_after_s: float = 5.0,
        namespace: str = NAMESPACE,
    ) -> None:
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"the Redis TTL must be positive, got {ttl_s}")
        if timeout_s <= 0:
            raise ValueError(f"the Redis timeout must be positive, got {timeout_s}")
        self.url = check_url(url)
        self.ttl_s = ttl_s
        self.retry_after_s = retry_after_s
        self.namespace = namespace
        try:
            self.client = redis_py.Redis.from_url(
                url,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                retry=Retry(NoBackoff(), 0),  # a failure is a miss at once; the tier then rests
            )
        except ValueError as exc:
            raise InvalidRedisURLError(f"not a Redis URL: {url!r} ({exc})") from exc
        self.stats = RedisStats()
        self._down_until = 0.0
        self.failing = False  # the last call failed (refused, timed out)

    def name(self, key: bytes) -> str:
        return self.namespace + key.hex()

    # --- availability
    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, error: Exception) -> None:
        self.stats.errors += 1
        if self.stats.errors == 1:
            log.warning(
                "Redis cache %s cannot be reached (%s): its blocks are misses and its writes dropped "
                "while it does not answer",
                _without_password(self.url),
                error,
            )
        self.failing = True
        self._down_until = time.monotonic() + self.retry_after_s
        self.client.connection_pool.disconnect()  # a half-read reply must not poison the next call

    # --- reads
    def get(self, key: bytes, expect: dict[str, str] | None = None) -> Found | None:
        return self.get_many([key], expect)[0]

    def get_many(self, keys: Sequence[bytes], expect: dict[str, str] | None = None) -> list[Found | None]:
        """Each key's block (None: missing, damaged or unreachable), in pipelined batches."""
        found: list[Found | None] = []
        for i in range(0, len(keys), _BATCH):
            batch = list(keys[i : i + _BATCH])
            values = self._mget(batch)
            bad = []
            for key, value in zip(batch, values):
                block = None if value is None else blockcodec.decode(key, value, expect)
                if block is None:
                    self.stats.misses += 1
                    if value is not None:
                        self.stats.corrupt += 1
                        bad.append(self.name(key))
                else:
                    self.stats.hits += 1
                    assert value is not None
                    self.stats.bytes_read += len(value)
                found.append(block)
            if bad:
                self._call(lambda bad=bad: self.client.delete(*bad))  # type: ignore[misc]
        return found

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        """Whether each key holds a value (one pipelined round trip; False where unreachable)."""
        if not keys:
            return []

        def run() -> list[bool]:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(self.name(key))
            return [bool(n) for n in pipe.execute()]

        result = self._call(run)
        return result if result is not None else [False] * len(keys)

    def _mget(self, keys: list[bytes]) -> list[bytes | None]:
        result: Any = self._call(lambda: self.client.mget([self.name(k) for k in keys]))
        return list(result) if result is not None else [None] * len(keys)

    # --- writes
    def put(self, key: bytes, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> int:
        return self.put_many([(key, tensors, meta)])

    def put_many(self, blocks: Sequence[tuple[bytes, dict[str, torch.Tensor], dict[str, str] | None]]) -> int:
        """Store every block (pipelined); bytes written (0 where the server could not take them)."""
        written = 0
        for i in range(0, len(blocks), _BATCH):
            if not self.available:  # resting: no encoding for a write that will not be made
                self.stats.skipped += 1
                continue
            values = [(self.name(k), blockcodec.encode(k, t, m)) for k, t, m in blocks[i : i + _BATCH]]

            def run(values: list[tuple[str, bytes]] = values) -> list[object]:
                pipe = self.client.pipeline(transaction=False)
                for name, data in values:
                    pipe.set(name, data, ex=None if self.ttl_s is None else max(1, int(self.ttl_s)))
                return list(pipe.execute())

            if self._call(run) is None:
                continue
            self.stats.writes += len(values)
            n = sum(len(data) for _, data in values)
            self.stats.bytes_written += n
            written += n
        return written

    def _call(self, fn: Callable[[], T]) -> T | None:
        """``fn()``, or None if the server is off or fails (counted; the tier rests a while)."""
        if not self.available:
            self.stats.skipped += 1
            return None
        try:
            result = fn()
        except (redis_py.RedisError, OSError) as exc:
            self._failed(exc)
            return None
        self.failing = False
        return result

    def close(self) -> None:
        self.client.close()
