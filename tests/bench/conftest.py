"""Fixtures for the benchmark tasks: trivial tokenizers, so no model is loaded."""

from __future__ import annotations

import pytest


class WhitespaceTokenizer:
    """One token per whitespace-separated word; the smallest thing with ``encode(str) -> list[int]``."""

    def encode(self, text: str) -> list[int]:
        return [len(word) for word in text.split()]


@pytest.fixture(scope="session")
def words() -> WhitespaceTokenizer:
    return WhitespaceTokenizer()
