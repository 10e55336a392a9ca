"""Prefix blocks through the disk tier: a new LLM (a restart) skips the prefill; damage is recomputed."""

from pathlib import Path

import pytest

from kvmem.engine.llm import LLM
from kvmem.model.loader import LoadedModel

DOC = "The harbor town kept its lamps lit through the long winter nights, and the ferry ran at six. "
Q1, Q2 = "When did the ferry run?", "What stayed lit?"


@pytest.mark.parametrize("policy", [None, "kivi4"])
def test_a_restarted_llm_reads_the_prefix_back_from_disk(
    tiny: LoadedModel, policy: str | None, tmp_path: Path
) -> None:
    first = LLM(tiny, block_size=4, prefill_chunk=4, policy=policy, disk_cache=tmp_path)
    first.generate(DOC + Q1, max_new_tokens=8)
    assert first.prefix is not None and first.prefix.disk is not None
    assert first.prefix.disk.stats.writes == len(first.prefix.disk.files()) > 0
    restarted = LLM(tiny, block_size=4, prefill_chunk=4, policy=policy, disk_cache=tmp_path)  # empty RAM
    result = restarted.generate(DOC + Q2, max_new_tokens=8)
    doc_blocks = len(restarted.encode(DOC)) // 4
    assert result.stats.tokens_reused == result.stats.tokens_from_disk == doc_blocks * 4
    assert (
        result.token_ids
        == LLM(tiny, block_size=4, prefill_chunk=4, policy=policy)
        .generate(DOC + Q2, max_new_tokens=8)
        .token_ids
    )
    restarted.pool.check_integrity()
    assert restarted.pool.bytes_used == restarted.pool.physical_nbytes()


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_block_file_is_recomputed(llama: LoadedModel, tmp_path: Path, damage: str) -> None:
    LLM(llama, block_size=4, prefill_chunk=4, disk_cache=tmp_path).generate(DOC + Q1, max_new_tokens=8)
    restarted = LLM(llama, block_size=4, prefill_chunk=4, disk_cache=tmp_path)
    assert restarted.prefix is not None and restarted.prefix.disk is not None
    disk = restarted.prefix.disk
    # damage the file of the document's 5th block: the first 4 still come from disk
    state = restarted.prefix.state()
    from kvmem.prefix.hashing import block_hashes

    fifth = disk.path(block_hashes(state.root, restarted.encode(DOC), 4)[4])
    data = fifth.read_bytes()
    if damage == "flip":
        fifth.write_bytes(data[:-7] + bytes([data[-7] ^ 0x10]) + data[-6:])
    elif damage == "truncate":
        fifth.write_bytes(data[:100])
    else:
        fifth.unlink()
    result = restarted.generate(DOC + Q2, max_new_tokens=8)
    assert result.stats.tokens_from_disk == result.stats.tokens_reused == 16
    assert disk.stats.corrupt == (0 if damage == "delete" else 1)
    assert (
        result.token_ids
        == LLM(llama, block_size=4, prefill_chunk=4).generate(DOC + Q2, max_new_tokens=8).token_ids
    )
    assert fifth.exists()  # recomputed and written again
    again = LLM(llama, block_size=4, prefill_chunk=4, disk_cache=tmp_path).generate(
        DOC + Q2, max_new_tokens=8
    )
    assert again.stats.tokens_from_disk == (len(restarted.encode(DOC + Q2)) - 1) // 4 * 4


def test_blocks_evicted_from_ram_come_back_from_disk(llama: LoadedModel, tmp_path: Path) -> None:
    llm = LLM(llama, kv_budget=80_000, block_size=4, prefill_chunk=4, disk_cache=tmp_path)
    llm.generate(DOC + Q1, max_new_tokens=4)  # ~58 KiB of blocks cached
    llm.generate(
        "Another text entirely, long enough to push the document out of RAM. More.", max_new_tokens=4
    )
    assert llm.pool.bytes_used <= 80_000
    result = llm.generate(DOC + Q2, max_new_tokens=4)
    assert result.stats.tokens_reused > 0 and result.stats.tokens_from_disk > 0
    assert (
        result.token_ids
        == LLM(llama, block_size=4, prefill_chunk=4).generate(DOC + Q2, max_new_tokens=4).token_ids
    )
    llm.pool.check_integrity()


def test_the_disk_cap_holds(llama: LoadedModel, tmp_path: Path) -> None:
    cap = 20_000  # a block file of the tiny llama is ~2 KiB
    llm = LLM(llama, block_size=4, prefill_chunk=4, disk_cache=tmp_path, disk_cache_max=cap)
    for i in range(4):
        llm.generate(f"{i} " + DOC, max_new_tokens=4)
        assert llm.prefix is not None and llm.prefix.disk is not None
        assert llm.prefix.disk.nbytes <= cap
    assert llm.prefix.disk.stats.evicted > 0
