"""uvicorn's server for ``kvmem serve``.

``Server`` starts the engine loop's drain the moment a shutdown begins: uvicorn waits for running
requests before the app's own shutdown runs, so a drain started there would never see them, and
uvicorn would cancel them at its own timeout (a dropped stream and a traceback in the log).
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import uvicorn


class Server(uvicorn.Server):
    """uvicorn's server with ``on_shutdown`` called as soon as a shutdown (SIGTERM, Ctrl-C) begins."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_shutdown = on_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.on_shutdown()
        await super().shutdown(sockets=sockets)
