"""What a compression policy may keep: bytes (a hard pool cap), a fraction of the full cache, or tokens."""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvmem.errors import InvalidBudgetError
from kvmem.kv.budget import parse_budget

_TOKENS = re.compile(r"^\s*([0-9]+)\s*(tok|toks|token|tokens)\s*$", re.IGNORECASE)
_PERCENT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*$")


@dataclass(frozen=True)
class KVBudget:
    """Exactly one of ``bytes``, ``fraction`` or ``tokens`` is set (all None: unlimited).

    - ``bytes``: the pool never holds more; a policy sizes each layer to fit.
    - ``fraction``: each compressed layer keeps at most this share of the tokens seen.
    - ``tokens``: each compressed layer keeps at most this many tokens.
    """

    bytes: int | None = None
    fraction: float | None = None
    tokens: int | None = None

    def __post_init__(self) -> None:
        if sum(v is not None for v in (self.bytes, self.fraction, self.tokens)) > 1:
            raise InvalidBudgetError("give a KV budget as bytes, a percentage or tokens, not several")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise InvalidBudgetError(f"a KV budget percentage must be in (0%, 100%], got {self.fraction:.0%}")
        if self.tokens is not None and self.tokens <= 0:
            raise InvalidBudgetError(f"a KV budget in tokens must be positive, got {self.tokens}")

    @property
    def unlimited(self) -> bool:
        return self.bytes is None and self.fraction is None and self.tokens is None

    @classmethod
    def parse(cls, budget: int | str | None) -> KVBudget:
        """``"64MiB"`` / int bytes, ``"25%"``, ``"512tok"``, or None / ``"unlimited"``."""
        if isinstance(budget, str):
            if match := _PERCENT.match(budget):
                return cls(fraction=float(match.group(1)) / 100)
            if match := _TOKENS.match(budget):
                return cls(tokens=int(match.group(1)))
        return cls(bytes=parse_budget(budget))
