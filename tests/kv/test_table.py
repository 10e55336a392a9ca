import pytest

from kvmem.kv.table import AppendPlan, BlockTable


def table(start: int, length: int, bs: int = 4) -> BlockTable:
    t = BlockTable(bs)
    t.start, t.length = start, length
    t.block_ids = list(range(-(-(length - start) // bs)))
    return t


@pytest.mark.parametrize(
    ("start", "length", "q", "keep", "plan"),
    [
        (0, 0, 10, None, AppendPlan(0, 0, 3, 3)),  # empty, full attention
        (0, 5, 3, None, AppendPlan(0, 0, 0, 2)),  # 3 free slots in the last block
        (0, 6, 2, None, AppendPlan(0, 0, 0, 2)),  # fits the last block exactly
        (0, 8, 1, None, AppendPlan(0, 0, 1, 3)),  # last block full
        (0, 9, 1, 7, AppendPlan(0, 0, 0, 3)),  # window: token 3 still needed, nothing drops
        (0, 12, 1, 7, AppendPlan(1, 0, 1, 3)),  # tokens 0..3 expired: first block drops
        (0, 6, 20, 7, AppendPlan(2, 13, 2, 2)),  # the chunk alone fills the window: restart
        (8, 14, 1, 7, AppendPlan(0, 0, 0, 2)),
    ],
)
def test_plan_append(start: int, length: int, q: int, keep: int | None, plan: AppendPlan) -> None:
    assert table(start, length).plan_append(q, keep) == plan


def test_last_fill_and_held() -> None:
    t = table(4, 11)
    assert (t.num_held, t.last_fill) == (7, 3)
    t.check()
