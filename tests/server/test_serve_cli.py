"""``kvmem serve``'s command in process: the port bound before anything loads, the loading lines."""

from __future__ import annotations

import io
import socket
import time

import pytest

from kvmem.cli import main
from kvmem.server.listen import ListenError, bind
from kvmem.server.progress import loading


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
    (sock,) = bind("127.0.0.1", 0)
    with sock:
        port = sock.getsockname()[1]
        with socket.socket() as client, pytest.raises(ConnectionRefusedError):
            client.connect(("127.0.0.1", port))  # refused until uvicorn listens, as before
    with pytest.raises(ListenError, match="check --host"):
        bind("no-such-host.invalid", 8000)


def test_a_name_is_bound_on_every_address_it_resolves_to() -> None:
    """As asyncio binds a host name: ``localhost`` on each of its loopback addresses, so a client of
    either reaches the server."""
    addresses = {info[4][0] for info in socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)}
    sockets = bind("localhost", 0)
    try:
        assert {sock.getsockname()[0] for sock in sockets} == addresses
    finally:
        for sock in sockets:
            sock.close()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_loading_prints_a_line_before_and_after() -> None:
    plain = io.StringIO()
    with loading("tiny", plain):
        assert plain.getvalue() == "kvmem serve: loading tiny…\n"
    assert plain.getvalue().splitlines()[1].startswith("kvmem serve: tiny loaded in ")
    terminal = _Terminal()
    with loading("tiny", terminal):
        time.sleep(0.5)  # a few ticks of the seconds counter (never timed)
    assert "kvmem serve: loading tiny… 00:00" in terminal.getvalue()
    assert terminal.getvalue().endswith(" s\n") and "tiny loaded in " in terminal.getvalue()


def test_loading_says_nothing_more_when_the_load_fails() -> None:
    plain = io.StringIO()
    with pytest.raises(RuntimeError), loading("tiny", plain):
        raise RuntimeError("no such model")
    assert plain.getvalue() == "kvmem serve: loading tiny…\n"
