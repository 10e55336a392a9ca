"""``kvmem.console``: the prefill bar shows on a terminal only, for a long prefill only."""

from __future__ import annotations

import io

from kvmem.console import PrefillBar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def feed(bar: PrefillBar, total: int, step: int) -> None:
    for done in range(step, total + step, step):
        bar(min(done, total), total)


def test_a_long_prefill_on_a_terminal_shows_a_bar_that_goes_away() -> None:
    out = Terminal()
    bar = PrefillBar(min_tokens=1024, stream=out)
    feed(bar, 2000, 512)
    assert "prefill:" in out.getvalue() and "/2000" in out.getvalue()
    assert bar._bar is None  # closed once done: a next chat turn starts its own


def test_no_bar_off_a_terminal_or_for_a_short_prefill() -> None:
    pipe, terminal = io.StringIO(), Terminal()
    feed(PrefillBar(min_tokens=1024, stream=pipe), 5000, 512)
    feed(PrefillBar(min_tokens=1024, stream=terminal), 1024, 512)
    assert pipe.getvalue() == terminal.getvalue() == ""
