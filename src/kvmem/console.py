"""What the ``kvmem`` command writes besides its results: kvmem's log records as one
``kvmem: warning: …`` line each on stderr, and a quiet end when the reader of stdout leaves."""

from __future__ import annotations

import contextlib
import logging
import os
import sys


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
