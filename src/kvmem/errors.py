"""Typed errors: everything a user, a file or a budget can cause raises one of these.

The CLI turns any ``KVMemError`` into one line on stderr and exit code 2.
"""

from __future__ import annotations


class KVMemError(Exception):
    """Base class of every error kvmem raises on purpose."""


class InvalidBudgetError(KVMemError, ValueError):
    """A KV budget could not be parsed or is out of range (negative, zero, unknown unit)."""


class KVBudgetError(KVMemError):
    """The KV pool cannot hold what a request needs; nothing was allocated for it.

    ``needed`` and ``available`` are in bytes. The pool stays usable after this error. ``advice``:
    what would make it fit, where the default (a request whose every token is held) is untrue.
    """

    def __init__(
        self,
        needed: int,
        available: int,
        budget: int | None,
        what: str = "the request",
        advice: str = "raise the KV budget (kv_budget= / --kv-budget), shorten the prompt or lower "
        "max_new_tokens (--max-new-tokens)",
    ) -> None:
        self.needed = needed
        self.available = available
        self.budget = budget
        super().__init__(
            f"KV budget exceeded: {what} needs {format_bytes(needed)} of KV cache but only "
            f"{format_bytes(available)} of the {format_bytes(budget) if budget is not None else 'unlimited'} "
            f"budget is free; {advice}"
        )


class ModelNotFoundError(KVMemError):
    """The model name is not an embedded model and is not a path to a model folder or a .gguf file."""


class PromptTooLongError(KVMemError):
    """The prompt does not fit in the model's context window."""


class CorruptCacheError(KVMemError):
    """A file in kvmem's cache folder is unreadable or does not match what was written."""


class SessionNotFoundError(KVMemError, FileNotFoundError):
    """No saved chat session at the path given."""


class SessionMismatchError(KVMemError):
    """A saved chat session was made with another model, policy, block size or file format.

    Its KV state is only valid for exactly what made it; the message says what that was.
    """


def format_bytes(n: int | float) -> str:
    """Human-readable binary size: ``format_bytes(3 * 2**20) == '3.00 MiB'``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
