"""The session file on its own floor: written from a cache and opened back without an engine
(the chat rebuilt from it is ``tests/tiers/test_session.py``'s)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from kvmem.errors import CorruptCacheError, SessionMismatchError
from kvmem.kv.pool import KVPool, PoolConfig
from kvmem.model.cache import KVMemCache
from kvmem.model.loader import LoadedModel
from kvmem.tiers.session import Conversation, SessionOrigin, open_session, restore_session, write_session
from kvmem.tiers.snapshot import snapshot

ORIGIN = SessionOrigin("tiny-llama", "id0", None, None, 4, "float32")


def filled(llama: LoadedModel, pool: KVPool, tokens: int) -> KVMemCache:
    cache = KVMemCache(pool, llama.spec)
    g = torch.Generator().manual_seed(0)
    shape = (llama.spec.num_kv_heads, tokens, llama.spec.head_dim)
    for layer in cache.kv_layers:
        layer.write(torch.randn(shape, generator=g), torch.randn(shape, generator=g))  # k, v: [H, q, D]
    return cache


def test_a_cache_and_conversation_round_trip(llama: LoadedModel, tmp_path: Path) -> None:
    pool = KVPool(PoolConfig(None, 4))
    cache = filled(llama, pool, 10)
    said = Conversation([{"role": "user", "content": "Hi"}], list(range(11)), 1, "tenant")
    path = write_session(tmp_path / "s.kvsession", ORIGIN, said, cache)
    saved = open_session(path, ORIGIN)
    assert saved.conversation == said
    again = KVMemCache(pool, llama.spec)
    restore_session(saved, again, torch.device("cpu"))
    before, after = snapshot(cache), snapshot(again)
    assert before.header == after.header
    assert all(torch.equal(t, after.tensors[name]) for name, t in before.tensors.items())
    pool.check_integrity()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"block_size": 8}, "block size 4, but this LLM has 8"),
        ({"identity": "id1"}, "model tiny-llama \\(identity id0\\)"),
        ({"policy": "kivi4"}, "policy none, but this LLM has kivi4"),
        ({"dtype": "bfloat16"}, "dtype float32, but this LLM runs bfloat16"),
    ],
)
def test_another_origin_is_refused(
    llama: LoadedModel, tmp_path: Path, change: dict[str, object], message: str
) -> None:
    cache = filled(llama, KVPool(PoolConfig(None, 4)), 3)
    path = write_session(tmp_path / "s.kvsession", ORIGIN, Conversation([], [1, 2, 3], 0, None), cache)
    with pytest.raises(SessionMismatchError, match=message):
        open_session(path, dataclasses.replace(ORIGIN, **change))  # type: ignore[arg-type]


def test_a_cache_longer_than_its_conversation_is_refused(llama: LoadedModel, tmp_path: Path) -> None:
    pool = KVPool(PoolConfig(None, 4))
    cache = filled(llama, pool, 6)
    path = write_session(tmp_path / "s.kvsession", ORIGIN, Conversation([], [1, 2], 0, None), cache)
    used = pool.bytes_used
    again = KVMemCache(pool, llama.spec)
    with pytest.raises(CorruptCacheError, match="more tokens than the conversation"):
        restore_session(open_session(path, ORIGIN), again, torch.device("cpu"))
    assert again.nbytes == 0 and pool.bytes_used == used
    pool.check_integrity()
