"""Incremental detokenization with stop strings: text comes out as soon as it is certain."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class StopMatcher:
    """Feed generated tokens one by one; get back the new text that is safe to show.

    Text that could still turn into a stop string is held back until it cannot. Once a stop
    string appears, ``stopped`` is True and ``text`` ends right before it.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.stopped = False
        self._ids: list[int] = []
        self._text = ""  # the text known to be final so far
        self._decoded = ""  # the latest decode, possibly ending in an incomplete character
        self._emitted = 0
        self._holdback = max((len(s) - 1 for s in self.stop), default=0)

    @property
    def text(self) -> str:
        return self._text

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self.tokenizer.decode(self._ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        self._decoded = text
        if text.endswith("\ufffd"):  # a multi-byte character may not be complete yet
            return ""
        self._text = text
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.stopped = True
            self._text = text[: min(cuts)]
            return self.flush()
        safe = max(self._emitted, len(text) - self._holdback)
        piece = text[self._emitted : safe]
        self._emitted = safe
        return piece

    def flush(self) -> str:
        """Everything not shown yet (call when generation ends)."""
        if not self.stopped:
            self._text = self._decoded
        piece = self._text[self._emitted :]
        self._emitted = len(self._text)
        return piece
