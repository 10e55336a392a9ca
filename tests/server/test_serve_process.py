"""A real ``kvmem serve`` process on 127.0.0.1: load, disconnects, kill -9 and restart, drain.

A tiny random model saved as a folder keeps these fast; ``test_openai_client.py`` runs SmolLM2.
Every loop here is bounded in count and time.
"""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from process import ServerProcess

from kvmem.engine.llm import LLM
from kvmem.model.loader import LoadedModel, load_model
from tiny_models import save_folder, tiny_llama

BLOCK = 16
VOCAB_TEXT = 250  # byte tokens only (the specials sit above)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_folder(tiny_llama(seed=3, context=512), tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def reference(tiny_folder: Path) -> LLM:
    """The same model in this process: what each prompt gives alone."""
    loaded: LoadedModel = load_model(str(tiny_folder), "float32")
    return LLM(loaded, block_size=BLOCK)


def base_args(folder: Path, budget: str, *more: str) -> list[str]:
    return [
        "--model",
        str(folder),
        "--dtype",
        "float32",
        "--kv-budget",
        budget,
        "--block-size",
        str(BLOCK),
        "--prefill-chunk",  # exact reuse ends on a chunk boundary: chunks of a block reuse every block
        str(BLOCK),
        *more,
    ]


def complete(client: httpx.Client, prompt: list[int], max_tokens: int, **extra: object) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **extra}
    return client.post("/v1/completions", json=body)


def test_load_200_requests_from_16_clients(tiny_folder: Path, reference: LLM, tmp_path: Path) -> None:
    rng = random.Random(0)
    shared = [rng.randrange(VOCAB_TEXT) for _ in range(96)]
    prompts = []
    for i in range(200):
        own = [rng.randrange(VOCAB_TEXT) for _ in range(rng.randrange(10, 120))]
        prompts.append(shared + own if i % 2 == 0 else own)
    new_tokens = [4 + i % 13 for i in range(200)]
    expected = [reference.generate(p, n).text for p, n in zip(prompts, new_tokens)]
    budget = 256 * 2**10  # about 3 requests' blocks at once
    args = base_args(
        tiny_folder,
        "256KiB",
        "--prefix-cache",
        "--max-num-seqs",
        "8",
        "--max-waiting",
        "4",
        "--reserve-new-tokens",
        "4",
    )
    with ServerProcess(args, tmp_path / "server.log") as server:
        server.wait_ready()
        rejected = [0] * 200

        def send(i: int) -> tuple[int, str, str]:
            with httpx.Client(base_url=server.url, timeout=120) as client:
                for _ in range(400):  # bounded: a 429 is retried after a short wait
                    r = complete(client, prompts[i], new_tokens[i])
                    if r.status_code != 429:
                        assert r.status_code == 200, r.text
                        return i, r.json()["id"], r.json()["choices"][0]["text"]
                    rejected[i] += 1
                    assert r.headers["retry-after"]
                    time.sleep(0.05)
            raise AssertionError(f"request {i} was refused 400 times")

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(send, range(200)))
        m = server.metrics()
    assert sorted(i for i, _, _ in answers) == list(range(200))  # none lost
    assert len({rid for _, rid, _ in answers}) == 200  # none duplicated
    assert [text for _, _, text in answers] == expected  # each as it is alone
    assert m["kvmem_kv_bytes_peak"] <= budget
    assert m["kvmem_kv_budget_bytes"] == budget
    assert m["kvmem_prefix_hit_tokens_total{tier=ram}"] > 0
    assert m["kvmem_requests_finished_total{reason=length}"] == 200
    assert m["kvmem_requests_refused_total{reason=queue_full}"] == sum(rejected)
    assert m["kvmem_kv_blocks{state=running}"] == 0


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(tiny_folder: Path, tmp_path: Path) -> None:
    with ServerProcess(base_args(tiny_folder, "1MiB"), tmp_path / "server.log") as server:
        server.wait_ready()
        body = {"prompt": list(range(40)), "max_tokens": 450, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=server.url, timeout=60) as client:
            with client.stream("POST", "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: {") for line in got)
        m = server.wait_metric("kvmem_requests_finished_total{reason=abort}", 1)
        assert m["kvmem_requests_finished_total{reason=abort}"] == 1
        m = server.wait_metric("kvmem_kv_bytes{state=used}", 0)
        assert m["kvmem_kv_bytes{state=used}"] == 0 and m["kvmem_kv_blocks{state=running}"] == 0
        assert m.get("kvmem_requests_finished_total{reason=length}", 0) == 0
        assert complete(server.client, [1, 2, 3], 2).status_code == 200


def test_kill_9_then_restart_on_the_same_disk_tier(tiny_folder: Path, reference: LLM, tmp_path: Path) -> None:
    disk = tmp_path / "kv"
    args = base_args(tiny_folder, "2MiB", "--disk-cache", str(disk), "--max-num-seqs", "8")
    rng = random.Random(1)
    prompts = [[rng.randrange(VOCAB_TEXT) for _ in range(rng.randrange(40, 200))] for _ in range(400)]
    done: dict[int, str] = {}
    first = ServerProcess(args, tmp_path / "first.log")
    try:
        first.wait_ready()

        def send(i: int) -> None:
            try:
                with httpx.Client(base_url=first.url, timeout=60) as client:
                    r = complete(client, prompts[i], 3)
                if r.status_code == 200:
                    done[i] = r.json()["choices"][0]["text"]
            except httpx.TransportError:
                pass  # the server was killed under it

        with ThreadPoolExecutor(8) as pool:
            for i in range(len(prompts)):
                pool.submit(send, i)
            deadline = time.monotonic() + 120
            while len(done) < 40 and time.monotonic() < deadline:
                time.sleep(0.02)
            first.kill()  # kill -9 mid-load: requests are still running
    finally:
        first.close()
    finished = dict(done)
    assert len(finished) >= 40  # killed once 40 were done (on a fast machine all may be: still a restart)

    def reusable(i: int) -> int:
        return (len(prompts[i]) - 1) // BLOCK * BLOCK

    with ServerProcess(args, tmp_path / "second.log") as second:
        second.wait_ready()
        hits, texts = 0, {}
        for i in finished:
            r = complete(second.client, prompts[i], 3)
            hits += r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
            texts[i] = r.json()["choices"][0]["text"]
        m = second.metrics()
        assert second.terminate() == 0
    persisted = sum(reusable(i) for i in finished)
    assert hits >= 0.95 * persisted, (hits, persisted)
    assert texts == finished
    assert m["kvmem_prefix_hit_tokens_total{tier=disk}"] == hits

    files = sorted(p for p in disk.rglob("*") if p.is_file())
    damaged = files[:5]
    for path in damaged:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    with ServerProcess(args, tmp_path / "third.log") as third:
        third.wait_ready()
        again = {i: complete(third.client, prompts[i], 3).json()["choices"][0]["text"] for i in finished}
        assert again == finished  # a damaged block is recomputed, never used
        assert third.metrics()["kvmem_disk_tier{event=corrupt}"] == len(damaged)
        i = next(iter(finished))
        other = complete(third.client, prompts[i], 3, cache_salt="another-tenant").json()
        assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert other["choices"][0]["text"] == finished[i]
        assert reference.generate(prompts[i], 3).text == finished[i]


def test_sigterm_drains_running_requests_flushes_and_exits_0(tiny_folder: Path, tmp_path: Path) -> None:
    disk = tmp_path / "kv"
    server = ServerProcess(base_args(tiny_folder, "1MiB", "--disk-cache", str(disk)), tmp_path / "server.log")
    with server:
        server.wait_ready()
        body = {"prompt": list(range(100)), "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=server.url, timeout=60) as client:
            with client.stream("POST", "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                next(line for line in lines if line.startswith("data: {"))
                server.proc.send_signal(15)  # SIGTERM while the request runs
                rest = [line for line in lines if line]
        events = [json.loads(line[6:]) for line in rest if line.startswith("data: {")]
        assert rest[-1] == "data: [DONE]"
        assert events[-1]["choices"][0]["finish_reason"] == "length"  # it ran to its end
        assert server.proc.wait(timeout=60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{server.url}/health", timeout=2)
    assert len([p for p in disk.rglob("*") if p.is_file()]) == (100 + 400 - 1) // BLOCK  # every full block


def test_sigterm_past_the_drain_timeout_ends_each_request_with_an_error(tmp_path: Path) -> None:
    # 8,000 new tokens cannot finish within the drain timeout: both requests are cut
    folder = save_folder(tiny_llama(seed=3, context=8192), tmp_path / "model")
    args = base_args(folder, "16MiB", "--drain-timeout", "0.5")
    prompt = list(range(40))
    with ServerProcess(args, tmp_path / "server.log") as server:
        server.wait_ready()

        def plain() -> httpx.Response:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                return complete(client, prompt, 8000)

        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(plain)
            assert (
                server.wait_metric("kvmem_requests{state=running}", 1)["kvmem_requests{state=running}"] == 1
            )
            body = {"prompt": prompt, "max_tokens": 8000, "ignore_eos": True, "stream": True}
            with httpx.Client(base_url=server.url, timeout=60) as client:
                with client.stream("POST", "/v1/completions", json=body) as r:
                    lines = r.iter_lines()
                    next(line for line in lines if line.startswith("data: {"))
                    server.proc.send_signal(15)  # SIGTERM while both run
                    rest = [line for line in lines if line]
            plain_answer = answer.result(timeout=60)
        assert server.proc.wait(timeout=60) == 0
        log = server.log()
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert error["code"] == "draining" and error["type"] == "server_error"
    assert error["message"].startswith("the server is shutting down")
    assert not any('"finish_reason":"length"' in line for line in rest)
    assert plain_answer.status_code == 503 and plain_answer.json()["error"]["code"] == "draining"
    assert "Traceback" not in log and "CancelledError" not in log, log
    assert "2 running request(s) cut" in log
    lines = log.splitlines()
    loading = next(i for i, line in enumerate(lines) if line.startswith("kvmem serve: loading "))
    listening = next(i for i, line in enumerate(lines) if " listening on http://127.0.0.1:" in line)
    assert loading < listening
