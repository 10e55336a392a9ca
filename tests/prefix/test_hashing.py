"""Chained block hashes: equal prefixes, equal hashes; anything that changes the KV changes them."""

from kvmem.prefix.hashing import block_hashes, chain_hash, root_hash

ROOT = root_hash("model-a", None, 4)


def test_only_full_blocks_are_hashed_and_chained() -> None:
    hashes = block_hashes(ROOT, list(range(11)), 4)
    assert len(hashes) == 2  # tokens 8..10 are a partial block
    assert hashes[0] == chain_hash(ROOT, [0, 1, 2, 3])
    assert hashes[1] == chain_hash(hashes[0], [4, 5, 6, 7])
    assert block_hashes(ROOT, list(range(11)), 4, start=1, previous=hashes[0]) == hashes[1:]


def test_a_block_hash_depends_on_everything_before_it() -> None:
    a = block_hashes(ROOT, [1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = block_hashes(ROOT, [9, 2, 3, 4, 5, 6, 7, 8], 4)  # same second block, different first
    assert a[1] != b[1]
    assert block_hashes(ROOT, [1, 2, 3, 4, 5, 6, 7, 8, 9], 4) == a


def test_root_separates_model_policy_block_size_and_salt() -> None:
    roots = {
        ROOT,
        root_hash("model-b", None, 4),
        root_hash("model-a", "kivi4", 4),
        root_hash("model-a", None, 8),
        root_hash("model-a", None, 4, salt="tenant-1"),
        root_hash("model-a", None, 4, salt="tenant-2"),
        root_hash("model-a", "", 4, salt="x"),
    }
    assert len(roots) == 7
    assert root_hash("model-a", None, 4) == ROOT  # deterministic
    # length-prefixed parts: moving a character from one part to the next changes the root
    assert root_hash("ab", "c", 4) != root_hash("a", "bc", 4)
