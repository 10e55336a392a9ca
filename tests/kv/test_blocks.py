import random

import pytest

from kvmem.errors import KVBudgetError
from kvmem.kv.blocks import BlockManager


def test_allocate_and_free_round_trip() -> None:
    m = BlockManager(budget=1000)
    a, b = m.allocate(100), m.allocate(300)
    assert (m.bytes_used, m.num_blocks, m.bytes_free) == (400, 2, 600)
    assert m.decref(a) is True
    assert (m.bytes_used, m.num_blocks) == (300, 1)
    c = m.allocate(50)
    assert c == a, "freed ids are reused"
    m.decref(b)
    m.decref(c)
    assert (m.bytes_used, m.num_blocks) == (0, 0)
    m.check_integrity()


def test_ref_counts() -> None:
    m = BlockManager(budget=None)
    a = m.allocate(10)
    m.incref(a)
    m.incref(a)
    assert m.ref_count(a) == 3
    assert m.decref(a) is False
    assert m.decref(a) is False
    assert m.bytes_used == 10
    assert m.decref(a) is True
    assert m.ref_count(a) == 0 and m.bytes_used == 0
    with pytest.raises(KeyError):
        m.decref(a)
    with pytest.raises(KeyError):
        m.incref(a)
    m.check_integrity()


def test_budget_error_changes_nothing_and_pool_stays_usable() -> None:
    m = BlockManager(budget=250)
    m.allocate(100)
    m.allocate(100)
    with pytest.raises(KVBudgetError) as err:
        m.allocate(100)
    assert err.value.needed == 100 and err.value.available == 50 and err.value.budget == 250
    assert "needs 100 B" in str(err.value) and "50 B" in str(err.value)
    # fits the Python API and the CLI alike
    assert "raise the KV budget (kv_budget= / --kv-budget)" in str(err.value)
    assert "lower max_new_tokens (--max-new-tokens)" in str(err.value)
    assert (m.bytes_used, m.num_blocks) == (200, 2)
    m.check_integrity()
    assert m.allocate(50) >= 0  # still usable, up to exactly the budget
    assert m.bytes_used == 250
    m.check_integrity()


def test_random_operations_never_exceed_budget() -> None:
    rng = random.Random(7)
    m = BlockManager(budget=10_000)
    live: list[int] = []
    for _ in range(3000):
        op = rng.random()
        if op < 0.5:
            try:
                live.append(m.allocate(rng.randint(1, 900)))
            except KVBudgetError:
                pass
        elif op < 0.65 and live:
            m.incref(rng.choice(live))
        elif live:
            block = live.pop(rng.randrange(len(live)))
            while not m.decref(block):
                pass
        assert m.bytes_used <= 10_000
        m.check_integrity()
    for block in live:
        while not m.decref(block):
            pass
    assert m.bytes_used == 0 and m.num_blocks == 0
    m.check_integrity()


def test_check_integrity_detects_corruption() -> None:
    m = BlockManager(budget=100)
    m.allocate(10)
    m._bytes_used = 5  # simulate a bookkeeping bug
    with pytest.raises(AssertionError):
        m.check_integrity()


def test_invalid_block_size() -> None:
    with pytest.raises(ValueError):
        BlockManager(None).allocate(0)
