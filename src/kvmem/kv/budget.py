"""Parsing of KV budgets given by a user: ``"64MiB"``, ``"1.5GB"``, ``1048576`` or ``"unlimited"``."""

from __future__ import annotations

import re

from kvmem.errors import InvalidBudgetError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 2**10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 2**20,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 2**30,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 2**40,
}
_UNLIMITED = {"unlimited", "none", "inf", "infinite", "max"}
MAX_BYTES = 2**63 - 1  # more than any machine holds: a larger size is a typo
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_budget(budget: int | str | None, what: str = "KV budget") -> int | None:
    """Return a budget in bytes, or ``None`` for unlimited.

    Accepts an int of bytes, a string with a decimal (kB, MB, GB) or binary (KiB, MiB, GiB) unit,
    or ``None`` / ``"unlimited"``. Raises ``InvalidBudgetError`` for anything else, for a budget
    that is not positive, and for one above ``MAX_BYTES``. ``what`` names the size in the message
    (``"disk cache size (disk_cache_max / --disk-cache-max)"``).
    """
    if budget is None:
        return None
    if isinstance(budget, bool):
        raise InvalidBudgetError(f"invalid {what} {budget!r}: expected bytes such as 64MiB")
    if isinstance(budget, int):
        if budget <= 0:
            raise InvalidBudgetError(f"invalid {what} {budget}: it must be a positive number of bytes")
        return _at_most_max(budget, budget, what)
    if not isinstance(budget, str):
        raise InvalidBudgetError(f"invalid {what} {budget!r}: expected bytes such as 64MiB")
    text = budget.strip()
    if text.lower() in _UNLIMITED:
        return None
    match = _PATTERN.match(text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise InvalidBudgetError(
            f"invalid {what} {budget!r}: expected a positive size such as 64MiB, 512MB, 1GiB, "
            "a number of bytes, or 'unlimited'"
        )
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value < 1:
        raise InvalidBudgetError(f"invalid {what} {budget!r}: it must be at least one byte")
    return _at_most_max(value, budget, what)


def _at_most_max(value: float, given: int | str, what: str) -> int:
    if value > MAX_BYTES:  # also a float that overflowed to inf
        raise InvalidBudgetError(
            f"invalid {what} {given!r}: larger than any machine could hold (at most 8 EiB); "
            "for no limit say 'unlimited'"
        )
    return int(value)
