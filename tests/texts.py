"""Real text for tests, from the Python standard library (no downloads)."""

from __future__ import annotations

from pydoc_data.topics import topics

from kvmem.model.loader import LoadedModel


def long_text(min_chars: int) -> str:
    """Python's own reference documentation, concatenated until ``min_chars`` long."""
    parts: list[str] = []
    for key in sorted(topics):
        parts.append(topics[key])
        if sum(map(len, parts)) >= min_chars:
            break
    return "\n".join(parts)


SHORT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "List three colors of the rainbow:",
]


def long_prompt(loaded: LoadedModel) -> list[int]:
    ids = loaded.tokenizer(long_text(12_000), add_special_tokens=True)["input_ids"]
    ids = (
        ids[:2100]
        + loaded.tokenizer("\n\nIn one sentence, the text above is about", add_special_tokens=False)[
            "input_ids"
        ]
    )
    assert len(ids) >= 2000
    return ids
