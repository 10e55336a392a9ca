"""``kvmem serve``'s command in process: the port bound before anything loads."""

from __future__ import annotations

import socket

import pytest

from kvmem.cli import main
from kvmem.server.listen import ListenError, bind


def test_a_port_in_use_exits_2_with_one_line_before_loading_anything(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # an embedded name: the model would load (seconds) if the port were not checked first
        assert main(["serve", "--model", "smollm2-135m", "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"kvmem: error: port {port} on 127.0.0.1 is already in use; pick another with --port"
    ]


def test_bind_returns_a_socket_not_yet_listening() -> None:
    with bind("127.0.0.1", 0) as sock:
        port = sock.getsockname()[1]
        with socket.socket() as client, pytest.raises(ConnectionRefusedError):
            client.connect(("127.0.0.1", port))  # refused until uvicorn listens, as before
    with pytest.raises(ListenError, match="check --host"):
        bind("no-such-host.invalid", 8000)
