"""Prefix blocks through the Redis tier: another LLM (another process's view) skips the prefill;
damage, a foreign model's block, another tenant and a dead server are recomputed, never wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from kvmem.bench.redis_server import redis_server
from kvmem.engine.llm import LLM
from kvmem.model.loader import LoadedModel
from kvmem.prefix.hashing import block_hashes
from kvmem.tiers import blockcodec
from tiny_models import tiny_llama

DOC = "The harbor town kept its lamps lit through the long winter nights, and the ferry ran at six. "
Q1, Q2 = "When did the ferry run?", "What stayed lit?"
BS = 4


def alone(model: LoadedModel, prompt: str, policy: str | None = None) -> list[int]:
    return (
        LLM(model, block_size=BS, prefill_chunk=BS, policy=policy)
        .generate(prompt, max_new_tokens=8)
        .token_ids
    )


@pytest.mark.parametrize("policy", [None, "kivi4"])
def test_a_second_llm_reads_the_prefix_from_redis(
    tiny: LoadedModel, policy: str | None, redis_url: str
) -> None:
    first = LLM(tiny, block_size=BS, prefill_chunk=BS, policy=policy, redis_cache=redis_url)
    first.generate(DOC + Q1, max_new_tokens=8)
    assert first.prefix is not None and first.prefix.redis is not None
    assert first.prefix.redis.stats.writes > 0
    second = LLM(tiny, block_size=BS, prefill_chunk=BS, policy=policy, redis_cache=redis_url)  # empty RAM
    result = second.generate(DOC + Q2, max_new_tokens=8)
    doc_blocks = len(second.encode(DOC)) // BS
    assert result.stats.tokens_reused == result.stats.tokens_from_redis == doc_blocks * BS
    assert result.stats.tokens_from_disk == 0
    assert result.token_ids == alone(tiny, DOC + Q2, policy)
    second.pool.check_integrity()
    assert second.pool.bytes_used == second.pool.physical_nbytes()


def test_redis_is_read_before_disk_and_disk_covers_what_redis_lost(
    llama: LoadedModel, redis_url: str, tmp_path: Path
) -> None:
    LLM(llama, block_size=BS, prefill_chunk=BS, redis_cache=redis_url, disk_cache=tmp_path).generate(
        DOC + Q1, max_new_tokens=8
    )
    both = LLM(llama, block_size=BS, prefill_chunk=BS, redis_cache=redis_url, disk_cache=tmp_path)
    r = both.generate(DOC + Q2, max_new_tokens=8)
    assert r.stats.tokens_from_redis == r.stats.tokens_reused > 0 and r.stats.tokens_from_disk == 0
    redis.Redis.from_url(redis_url).flushall()  # Redis evicted everything (or restarted empty)
    again = LLM(llama, block_size=BS, prefill_chunk=BS, redis_cache=redis_url, disk_cache=tmp_path)
    r2 = again.generate(DOC + Q2, max_new_tokens=8)
    whole = (len(again.encode(DOC + Q2)) - 1) // BS * BS  # `both` stored its own blocks too
    assert r2.stats.tokens_from_disk == r2.stats.tokens_reused == whole
    assert r2.token_ids == r.token_ids == alone(llama, DOC + Q2)


def test_another_tenant_gets_nothing_from_redis(llama: LoadedModel, redis_url: str) -> None:
    first = LLM(llama, block_size=BS, prefill_chunk=BS, redis_cache=redis_url)
    first.engine.add_request(first.encode(DOC + Q1), max_new_tokens=4, cache_salt="tenant-a")
    list(first.engine.run_until_done(list(first.engine.requests)))
    second = LLM(llama, block_size=BS, prefill_chunk=BS, redis_cache=redis_url)
    ids = {
        salt: second.engine.add_request(second.encode(DOC + Q2), max_new_tokens=4, cache_salt=salt)
        for salt in ("tenant-b", "tenant-a")
    }
    outputs = {o.request_id: o for o in second.engine.run_until_done(list(ids.values())) if o.finished}
    reused = {salt: outputs[rid].result.stats.tokens_from_redis for salt, rid in ids.items()}  # type: ignore[union-attr]
    assert reused["tenant-b"] == 0 and reused["tenant-a"] > 0


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign-model"])
def test_a_damaged_or_foreign_block_is_recomputed(llama: LoadedModel, redis_url: str, damage: str) -> None:
    LLM(llama, block_size=BS, prefill_chunk=BS, redis_cache=redis_url).generate(DOC + Q1, max_new_tokens=8)
    second = LLM(llama, block_size=BS, prefill_chunk=BS, redis_cache=redis_url)
    assert second.prefix is not None and second.prefix.redis is not None
    tier = second.prefix.redis
    fifth = block_hashes(second.prefix.state().root, second.encode(DOC), BS)[4]
    raw = redis.Redis.from_url(redis_url)
    data = raw.get(tier.name(fifth))
    assert isinstance(data, bytes)
    if damage == "flip":
        data = data[:-7] + bytes([data[-7] ^ 0x10]) + data[-6:]
    elif damage == "truncate":
        data = data[:100]
    else:  # another model's valid block, re-keyed under this key (a collision, a misconfigured peer)
        other = LLM(tiny_llama(seed=7), block_size=BS, prefill_chunk=BS, redis_cache=redis_url)
        other.generate(DOC + Q1, max_new_tokens=2)
        assert other.prefix is not None
        its_fifth = block_hashes(other.prefix.state().root, other.encode(DOC), BS)[4]
        found = blockcodec.decode(its_fifth, raw.get(tier.name(its_fifth)))  # type: ignore[arg-type]
        assert found is not None and found[1]["model"] != second.loaded.identity
        data = blockcodec.encode(fifth, *found)  # checksum and key valid: only the model differs
    raw.set(tier.name(fifth), data)
    result = second.generate(DOC + Q2, max_new_tokens=8)
    assert result.stats.tokens_from_redis == result.stats.tokens_reused == 4 * BS  # blocks 0-3
    assert tier.stats.corrupt == 1
    assert result.token_ids == alone(llama, DOC + Q2)
    # recomputed and written again: a third LLM reads the whole document from Redis
    again = LLM(llama, block_size=BS, prefill_chunk=BS, redis_cache=redis_url).generate(
        DOC + Q2, max_new_tokens=8
    )
    assert again.stats.tokens_from_redis == (len(second.encode(DOC + Q2)) - 1) // BS * BS


def test_redis_killed_mid_run_is_a_miss_not_a_failure(llama: LoadedModel, tmp_path: Path) -> None:
    with redis_server(tmp_path) as server:
        first = LLM(llama, block_size=BS, prefill_chunk=BS, redis_cache=server.url)
        first.generate(DOC + Q1, max_new_tokens=8)
        second = LLM(llama, block_size=BS, prefill_chunk=BS, redis_cache=server.url)
        server.kill()
    results = [second.generate(DOC + q, max_new_tokens=8) for q in (Q2, Q1)]
    assert second.prefix is not None and second.prefix.redis is not None
    assert second.prefix.redis.stats.errors == 1  # one refused call, then the tier rests
    assert results[0].stats.tokens_from_redis == 0
    assert results[0].token_ids == alone(llama, DOC + Q2)
    assert results[1].token_ids == alone(llama, DOC + Q1)
    assert results[1].stats.tokens_reused > 0  # RAM still shares the document between them


def test_a_bad_redis_url_is_refused_before_anything_runs(llama: LoadedModel) -> None:
    from kvmem.tiers.redis import InvalidRedisURLError

    with pytest.raises(InvalidRedisURLError):
        LLM(llama, redis_cache="localhost:6379")
