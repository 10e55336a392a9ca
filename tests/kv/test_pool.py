import pytest
import torch

from kvmem.errors import KVBudgetError
from kvmem.kv.pool import KVPool, PoolConfig, block_nbytes


def test_bytes_used_equals_tensor_nbytes() -> None:
    pool = KVPool(PoolConfig(budget=None, block_size=16))
    ids = [pool.allocate(3, 64, torch.float32, torch.device("cpu")) for _ in range(5)]
    ids.append(pool.allocate(1, 256, torch.bfloat16, torch.device("cpu")))
    expected = 5 * 2 * 3 * 16 * 64 * 4 + 2 * 1 * 16 * 256 * 2
    assert pool.bytes_used == expected
    assert pool.physical_nbytes() == expected
    assert sum(pool.tensor(i).nbytes for i in ids) == expected
    pool.check_integrity()
    for i in ids:
        pool.decref(i)
    assert pool.bytes_used == 0 and pool.physical_nbytes() == 0
    pool.check_integrity()


def test_budget_is_a_hard_cap_and_pool_stays_usable() -> None:
    one = block_nbytes(2, 8, 4, torch.float32)
    pool = KVPool(PoolConfig(budget=3 * one, block_size=4))
    ids = [pool.allocate(2, 8, torch.float32, torch.device("cpu")) for _ in range(3)]
    with pytest.raises(KVBudgetError):
        pool.allocate(2, 8, torch.float32, torch.device("cpu"))
    assert pool.bytes_used == 3 * one == pool.physical_nbytes()
    pool.check_integrity()
    pool.decref(ids[0])
    pool.allocate(2, 8, torch.float32, torch.device("cpu"))
    pool.check_integrity()


def test_shared_block_is_freed_with_its_last_reference() -> None:
    pool = KVPool(PoolConfig(block_size=4))
    block = pool.allocate(1, 4, torch.float32, torch.device("cpu"))
    pool.incref(block)
    pool.decref(block)
    assert pool.physical_nbytes() == pool.bytes_used > 0
    pool.decref(block)
    assert pool.physical_nbytes() == pool.bytes_used == 0


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        PoolConfig(block_size=0)
    with pytest.raises(ValueError):
        PoolConfig(budget=-1)
