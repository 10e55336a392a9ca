"""What the ``kvmem`` command writes besides its results: kvmem's log records as one
``kvmem: warning: …`` line each on stderr, a progress bar through a long prefill (on a terminal),
and a quiet end when the reader of stdout leaves."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import TextIO

from tqdm import tqdm


class _StderrLines(logging.Handler):
    """A record as ``kvmem: <level>: <message>`` on the stderr of the moment (tests replace it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(f"kvmem: {record.levelname.lower()}: {record.getMessage()}", file=sys.stderr, flush=True)
        except Exception:  # a log line must never end the command
            self.handleError(record)


def log_to_stderr() -> None:
    """Show kvmem's warnings (a tier that cannot be written or reached) on stderr; once per process."""
    logger = logging.getLogger("kvmem")
    if not any(isinstance(h, _StderrLines) for h in logger.handlers):
        logger.addHandler(_StderrLines(logging.WARNING))


def detach_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush of what is buffered for a closed
    pipe does not print a BrokenPipeError of its own."""
    with contextlib.suppress(OSError, ValueError):  # stdout without a file descriptor (tests)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class PrefillBar:
    """An ``on_prefill`` callback (``LLM.stream``, ``ChatSession.stream``): a bar on stderr through
    a prefill of more than ``min_tokens`` tokens, shown only on a terminal and gone once it is done."""

    def __init__(self, min_tokens: int, stream: TextIO | None = None) -> None:
        self.min_tokens = min_tokens
        self.stream = stream
        self._bar: tqdm | None = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            stream = self.stream or sys.stderr
            if total <= self.min_tokens or done >= total or not stream.isatty():
                return
            self._bar = tqdm(total=total, desc="prefill", unit="tok", leave=False, file=stream)
        self._bar.update(done - self._bar.n)
        if done >= total:
            self._bar.close()
            self._bar = None
