"""`kvmem chat --session NAME`: resume a saved conversation; bad files exit 2 with one line.

In-process (``main`` with stdin replaced): each interpreter start would cost seconds.
"""

from __future__ import annotations

import io
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest

from kvmem.cli import main
from kvmem.model.loader import LoadedModel
from kvmem.tiers.session import read_session
from tiny_models import save_folder


class Run(NamedTuple):
    """One `kvmem chat` run: exit code, stdout (the answers), stderr (stats, messages)."""

    code: int
    out: str
    err: str

    @property
    def prefilled(self) -> list[int]:
        """Tokens prefilled by each turn, from the stats lines."""
        return [int(n) for n in re.findall(r"prefill (\d+) tok", self.err)]


Chat = Callable[..., Run]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, llama: LoadedModel) -> str:
    return str(save_folder(llama, tmp_path_factory.mktemp("cli-session") / "tiny-llama"))


@pytest.fixture
def chat(folder: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Chat:
    """Run `kvmem chat` on the tiny model with these stdin lines and extra arguments."""

    def run(stdin: str, *args: str) -> Run:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = main(["chat", "--model", folder, "--max-new-tokens", "6", *args])
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    return run


def test_resumed_session_continues_as_if_never_stopped(chat: Chat, tmp_path: Path) -> None:
    path = str(tmp_path / "talk.kvsession")
    whole = chat("hi\nagain\n")
    first = chat("hi\n", "--session", path)
    second = chat("again\n", "--session", path)
    assert whole.code == first.code == second.code == 0
    assert len(whole.prefilled) == 2 and first.out.strip() and second.out.strip()
    assert "resumed session" not in first.err
    assert re.search(r"resumed session .*talk\.kvsession: 1 turns, \d+ tokens", second.err)
    assert first.out + second.out == whole.out  # the same answers
    assert first.prefilled + second.prefilled == whole.prefilled  # the second run computed only its turn
    assert read_session(Path(path))[0]["turns"] == 2


def test_a_bare_name_lives_in_the_cache_folder(
    chat: Chat, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVMEM_CACHE_DIR", str(tmp_path))
    assert chat("hi\n", "--session", "work").code == 0
    header, _ = read_session(tmp_path / "sessions" / "work.kvsession")
    assert header["turns"] == 1 and header["messages"][0] == {"role": "user", "content": "hi"}


def test_reset_starts_the_saved_session_over(chat: Chat, tmp_path: Path) -> None:
    path = tmp_path / "talk.kvsession"
    assert chat("hi\n/reset\nagain\n", "--session", str(path)).code == 0
    header, _ = read_session(path)
    assert header["turns"] == 1 and header["messages"][0] == {"role": "user", "content": "again"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policy", "kivi4"], "saved with policy none, but this LLM has kivi4"),
        (["--block-size", "32"], "saved with block size 64, but this LLM has 32"),
    ],
)
def test_mismatched_session_exits_2(chat: Chat, tmp_path: Path, args: list[str], message: str) -> None:
    path = tmp_path / "talk.kvsession"
    chat("hi\n", "--session", str(path))
    before = path.read_bytes()
    run = chat("again\n", "--session", str(path), *args)
    assert run.code == 2
    assert run.err.count("\n") == 1 and message in run.err and "Traceback" not in run.err
    assert path.read_bytes() == before  # the session is not overwritten


def test_corrupt_session_exits_2(chat: Chat, tmp_path: Path) -> None:
    path = tmp_path / "talk.kvsession"
    path.write_bytes(b"not a session")
    run = chat("hi\n", "--session", str(path))
    assert run.code == 2 and run.err.count("\n") == 1 and "not a readable kvmem session file" in run.err
    assert path.read_bytes() == b"not a session"


def test_help_explains_sessions(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["chat", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0
    assert "--session NAME" in out and "sessions/NAME.kvsession" in out and "nothing is recomputed" in out
