"""``loading``: what ``kvmem serve`` shows while its model loads (tens of seconds on first use).

A plain line before and after, so a log shows where the time went; on a terminal, a line that
counts the seconds in between instead of the first one.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from tqdm.auto import tqdm


@contextmanager
def loading(what: str, stream: TextIO | None = None) -> Iterator[None]:
    """``kvmem serve: loading {what}…`` (counting seconds on a terminal) while the block runs, then
    ``kvmem serve: {what} loaded in N s``; nothing more if the block raises."""
    stream = stream or sys.stderr
    start = time.perf_counter()
    line = f"kvmem serve: loading {what}…"
    if not stream.isatty():
        print(line, file=stream, flush=True)
        yield
    else:
        bar = tqdm(desc=line, bar_format="{desc} {elapsed}", file=stream, leave=False)
        done = threading.Event()
        ticker = threading.Thread(target=_tick, args=(bar, done), name="kvmem-loading", daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()
            bar.close()
    print(f"kvmem serve: {what} loaded in {time.perf_counter() - start:.1f} s", file=stream, flush=True)


def _tick(bar: tqdm, done: threading.Event) -> None:
    while not done.wait(0.2):
        bar.refresh()
