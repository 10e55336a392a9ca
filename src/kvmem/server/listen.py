"""Where ``kvmem serve`` listens: the socket bound before the model loads, and uvicorn's server
around it.

The port is bound first, so a port in use fails at once, in one line, not after a model load.
The socket listens only once uvicorn starts it: while the model loads, a connection is refused
as before. ``Server`` prints the banner once uvicorn listens, and starts the engine loop's drain
the moment a shutdown begins: uvicorn waits for running requests before the app's own shutdown
runs, so a drain started there would never see them.
"""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import Callable

import uvicorn

from kvmem.errors import KVMemError


class ListenError(KVMemError):
    """``kvmem serve`` cannot listen where it was told to (a port in use, an address not here)."""


def bind(host: str, port: int) -> list[socket.socket]:
    """TCP sockets bound to ``host:port`` as uvicorn binds them (``SO_REUSEADDR``; one per address
    the name resolves to, as asyncio's own servers: ``localhost`` is 127.0.0.1 and ::1), not
    listening yet; ``ListenError`` with what to do if one cannot be bound."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {host!r}: {exc.strerror}; check --host") from None
    sockets: list[socket.socket] = []
    seen = set()
    try:
        for family, kind, proto, _, address in found:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sockets.append(_bound(family, kind, proto, address, host, port))
    except ListenError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _bound(family: int, kind: int, proto: int, address: tuple, host: str, port: int) -> socket.socket:
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio's own servers
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(f"port {port} on {host} is already in use; pick another with --port") from None
        raise ListenError(f"cannot listen on {host} port {port}: {exc.strerror}") from None
    return sock


class Server(uvicorn.Server):
    """uvicorn's server with ``banner`` printed once it listens and ``on_shutdown`` called as soon
    as a shutdown (SIGTERM, Ctrl-C) begins."""

    def __init__(self, config: uvicorn.Config, banner: str, on_shutdown: Callable[[], None]) -> None:
        super().__init__(config)
        self.banner = banner
        self.on_shutdown = on_shutdown

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            print(self.banner, file=sys.stderr, flush=True)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.on_shutdown()
        await super().shutdown(sockets=sockets)
