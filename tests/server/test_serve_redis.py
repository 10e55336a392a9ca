"""Two real ``kvmem serve`` replicas sharing one real Redis on 127.0.0.1: each reuses the prefixes
the other computed, and ``kill -9`` of either loses nothing the other needs."""

from __future__ import annotations

import random
from pathlib import Path

import httpx
import pytest
from process import ServerProcess
from test_serve_process import BLOCK, VOCAB_TEXT, base_args, complete

from kvmem.engine.llm import LLM
from kvmem.model.loader import LoadedModel, load_model
from tiny_models import save_folder, tiny_llama


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_folder(tiny_llama(seed=5, context=512), tmp_path_factory.mktemp("tiny") / "model")


def cached(r: httpx.Response) -> int:
    assert r.status_code == 200, r.text
    return int(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


def text(r: httpx.Response) -> str:
    return str(r.json()["choices"][0]["text"])


def test_two_replicas_share_prefixes_through_redis_and_survive_kill_9(
    folder: Path, redis_url: str, tmp_path: Path
) -> None:
    rng = random.Random(4)
    prompts = [[rng.randrange(VOCAB_TEXT) for _ in range(rng.randrange(60, 200))] for _ in range(12)]
    reusable = [(len(p) - 1) // BLOCK * BLOCK for p in prompts]
    args = base_args(folder, "4MiB", "--redis-cache", redis_url)
    a = ServerProcess(args, tmp_path / "a.log")
    b = ServerProcess(args, tmp_path / "b.log")
    try:
        a.wait_ready()
        b.wait_ready()
        first = {i: complete(a.client, prompts[i], 4) for i in range(6)}  # A computes 0-5
        assert all(cached(r) == 0 for r in first.values())
        a.kill()  # kill -9: what A finished is in Redis, not in A
        from_a = {i: complete(b.client, prompts[i], 4) for i in range(6)}
        assert [cached(r) for r in from_a.values()] == reusable[:6]
        assert {i: text(r) for i, r in from_a.items()} == {i: text(r) for i, r in first.items()}
        m = b.metrics()
        assert m["kvmem_prefix_hit_tokens_total{tier=redis}"] == sum(reusable[:6])
        assert m["kvmem_redis_tier{event=corrupt}"] == 0
        second = {i: complete(b.client, prompts[i], 4) for i in range(6, 12)}  # B computes 6-11
        b.kill()
    finally:
        a.close()
        b.close()
    with ServerProcess(args, tmp_path / "a2.log") as restarted:  # A again, with empty RAM
        restarted.wait_ready()
        from_b = {i: complete(restarted.client, prompts[i], 4) for i in range(6, 12)}
        assert [cached(r) for r in from_b.values()] == reusable[6:]
        assert {i: text(r) for i, r in from_b.items()} == {i: text(r) for i, r in second.items()}
        salted = complete(restarted.client, prompts[0], 4, cache_salt="another-tenant")
        assert cached(salted) == 0 and text(salted) == text(first[0])
    loaded: LoadedModel = load_model(str(folder), "float32")
    reference = LLM(loaded, block_size=BLOCK)
    assert reference.generate(prompts[0], 4).text == text(first[0])
    assert reference.generate(prompts[7], 4).text == text(second[7])
