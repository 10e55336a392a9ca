"""Real text for tests, from the Python standard library (no downloads)."""

from __future__ import annotations

from pydoc_data.topics import topics


def long_text(min_chars: int) -> str:
    """Python's own reference documentation, concatenated until ``min_chars`` long."""
    parts: list[str] = []
    for key in sorted(topics):
        parts.append(topics[key])
        if sum(map(len, parts)) >= min_chars:
            break
    return "\n".join(parts)
