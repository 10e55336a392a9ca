import pytest

from kvmem.errors import InvalidBudgetError
from kvmem.kv.budget import parse_budget


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64MiB", 64 * 2**20),
        ("64 MiB", 64 * 2**20),
        ("64mib", 64 * 2**20),
        ("512MB", 512 * 10**6),
        ("1.5GiB", int(1.5 * 2**30)),
        ("1024", 1024),
        ("8k", 8000),
        (4096, 4096),
        (None, None),
        ("unlimited", None),
        ("none", None),
    ],
)
def test_parse_budget(text: str | int | None, expected: int | None) -> None:
    assert parse_budget(text) == expected


@pytest.mark.parametrize(
    "bad", ["-5", "-5MiB", "0", 0, -1, "abc", "12 parsecs", "MiB", "", "1e3", True, 1.5, "0.1"]
)
def test_bad_budgets_raise_typed_error(bad: object) -> None:
    with pytest.raises(InvalidBudgetError, match="invalid KV budget"):
        parse_budget(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("huge", ["99999999999999999999GiB", "9" * 400, 2**63])
def test_a_budget_no_machine_could_hold_is_refused(huge: int | str) -> None:
    with pytest.raises(InvalidBudgetError, match="larger than any machine could hold"):
        parse_budget(huge)


def test_the_message_names_the_size_at_fault() -> None:
    with pytest.raises(InvalidBudgetError, match=r"^invalid disk cache size 'abc'"):
        parse_budget("abc", what="disk cache size")
