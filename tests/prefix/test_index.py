"""The prefix index's books, without tensors: references, matching, LRU eviction."""

from kvmem.kv.blocks import BlockManager
from kvmem.prefix.index import PrefixIndex


def _index_with_chain(manager: BlockManager, n: int) -> tuple[PrefixIndex, list[list[int]]]:
    index = PrefixIndex(manager)
    blocks = []
    for depth in range(n):
        ids = [manager.allocate(100), manager.allocate(100)]  # two layers
        index.insert(bytes([depth]), depth, ids)
        for block_id in ids:  # the computing sequence finishes: only the index holds them
            manager.decref(block_id)
        blocks.append(ids)
    return index, blocks


def test_insert_holds_a_reference_and_match_stops_at_the_first_miss() -> None:
    manager = BlockManager(None)
    index, blocks = _index_with_chain(manager, 3)
    assert all(manager.ref_count(b) == 1 for ids in blocks for b in ids)
    assert manager.bytes_used == 600 == index.nbytes == index.reclaimable()
    assert [e.depth for e in index.match([b"\x00", b"\x01", b"\x07", b"\x02"])] == [0, 1]
    assert not index.insert(b"\x00", 0, [99])  # already there: nothing changes
    index.check_integrity()


def test_reclaim_frees_least_recently_used_unused_blocks_only() -> None:
    manager = BlockManager(None)
    index, blocks = _index_with_chain(manager, 3)
    index.match([b"\x00"])  # block 0 used most recently
    manager.incref(blocks[1][0])  # a live sequence holds block 1 of layer 0 (not of layer 1)
    assert index.reclaimable() == 500
    # LRU order: entry 1 (only its unused layer 1 goes), then entry 2; entry 0 was just used
    assert index.reclaim(150) == 300
    assert b"\x02" not in index and b"\x01" in index and b"\x00" in index
    entry = index.get(b"\x01")
    assert entry is not None and entry.blocks == (blocks[1][0], None)
    assert index.reclaim(10_000) == 200  # then block 0
    assert len(index) == 1 and manager.bytes_used == 100
    refill = manager.allocate(100)
    assert not index.insert(b"\x01", 1, [blocks[1][0], refill])  # fills the layer it had lost
    manager.decref(refill)  # the sequence that computed it finishes
    assert index.get(b"\x01").blocks == (blocks[1][0], refill)  # type: ignore[union-attr]
    assert index.reclaimable() == 100
    manager.decref(blocks[1][0])
    assert index.reclaimable() == 200
    index.clear()
    assert manager.num_blocks == 0
    manager.check_integrity()


def test_among_equally_recent_entries_the_deepest_goes_first() -> None:
    manager = BlockManager(None)
    index, _ = _index_with_chain(manager, 3)
    index.match([b"\x00", b"\x01", b"\x02"])
    index.reclaim(1)
    assert b"\x02" not in index and b"\x01" in index
