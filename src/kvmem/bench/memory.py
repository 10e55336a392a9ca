"""Peak resident memory while a piece of work runs, sampled from ``/proc``: of this process, or of
another process and all its descendants (a server and its workers).

``resource.getrusage`` only knows the peak of the whole process's life; a benchmark needs the peak
of each run, so a thread samples ``/proc/<pid>/statm`` every few milliseconds. Where ``/proc`` is
missing (not Linux) it reports 0.
"""

from __future__ import annotations

import os
import threading
from types import TracebackType

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes(pid: int | str = "self") -> int:
    """Resident bytes of a process now (0 where ``/proc`` is missing or it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, from ``/proc/<pid>/task/*/children``."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return found


def tree_rss_bytes(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants now (shared pages counted in each)."""
    return sum(rss_bytes(p) for p in descendants(pid))


class PeakRSS:
    """``with PeakRSS() as peak: ...``; then ``peak.growth`` is the largest RSS above the start and
    ``peak.peak`` the largest RSS. With ``pid``: of that process and its descendants."""

    def __init__(self, interval: float = 0.005, pid: int | None = None) -> None:
        self.interval = interval
        self._read = rss_bytes if pid is None else lambda: tree_rss_bytes(pid)
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._read())

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self._read()
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._read())

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.start)
