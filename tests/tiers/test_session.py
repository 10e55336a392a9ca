"""Saved chat sessions: an exact round trip, a continuation equal to never stopping (in this
process and in new ones), and a clear typed error for every file that must not load."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from kvmem import (
    LLM,
    ChatSession,
    CorruptCacheError,
    KVBudgetError,
    SessionMismatchError,
    SessionNotFoundError,
    load_chat,
)
from kvmem.model.loader import LoadedModel
from kvmem.model.spec import ModelSpec
from kvmem.tiers import session as session_file
from kvmem.tiers.session import read_session, session_path
from kvmem.tiers.snapshot import snapshot
from tiny_models import save_folder, tiny_llama

TURNS = ["What is the capital of France?", "And of Germany?", "Which one is larger?"]
NEW_TOKENS = 8

# (model fixture, policy, budget): every layer kind and every piece of state a policy keeps
CASES = [
    ("llama", None, None),
    ("gemma", None, None),  # sliding-window layers that have dropped blocks
    ("llama", "kivi4", None),  # quantized blocks stay packed bytes
    ("gemma", "kivi4", None),
    ("gemma", "rotk3v2+res8", None),  # the block being filled in its own format, in every layer
    ("gemma", "rotk4v2+sliding-rot2+res8", None),  # sliding layers at a format of their own
    ("llama", "snapkv+mixed-rot2+rotk4v2+res8", "16KiB"),
    ("llama", "bfp4", None),  # the layout's key-channel permutation
    ("llama", "h2o", "16KiB"),  # accumulated attention
    ("llama", "snapkv+kivi4", "16KiB"),  # recent queries, quantized
    ("llama", "snapkv+pyramid", "16KiB"),
    ("llama", "h2o+cake", "16KiB"),  # measured layer shares
    ("llama", "snapkv+adakv", "16KiB"),  # ragged layers: blocks per head
    ("llama", "snapkv+mixed", "16KiB"),  # mixed layers: high and low precision
    ("llama", "snapkv+merge", "16KiB"),
]
IDS = [f"{model}-{policy or 'none'}" for model, policy, _ in CASES]


def make_llm(loaded: LoadedModel, policy: str | None, budget: str | None) -> LLM:
    return LLM(loaded, kv_budget=budget, block_size=4, policy=policy)


def chatted(llm: LLM, turns: list[str]) -> ChatSession:
    session = llm.chat(system="Answer briefly.")
    for message in turns:
        session.send(message, max_new_tokens=NEW_TOKENS)
    return session


def assert_same_state(a: ChatSession, b: ChatSession) -> None:
    """Conversation, table state, scorer state and every block's bytes are equal."""
    assert (a.messages, a.sequence.token_ids, a.turns) == (b.messages, b.sequence.token_ids, b.turns)
    snap_a, snap_b = snapshot(a.sequence.cache), snapshot(b.sequence.cache)
    assert snap_a.header == snap_b.header
    assert snap_a.tensors.keys() == snap_b.tensors.keys()
    for name, tensor in snap_a.tensors.items():
        other = snap_b.tensors[name]
        assert tensor.dtype == other.dtype and torch.equal(
            tensor.view(torch.uint8), other.view(torch.uint8)
        ), name
    assert a.kv_bytes == b.kv_bytes


@pytest.mark.parametrize(("model", "policy", "budget"), CASES, ids=IDS)
def test_round_trip_is_exact(
    model: str, policy: str | None, budget: str | None, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    loaded: LoadedModel = request.getfixturevalue(model)
    saved = chatted(make_llm(loaded, policy, budget), TURNS[:2])
    cache = saved.sequence.cache
    if budget is not None:  # the policy has evicted (or demoted) tokens: not a trivial state
        assert any(layer.held < layer.seq_length for layer in cache.kv_layers)
    if model == "gemma":  # a sliding layer has dropped the blocks that left its window
        assert any(layer.table.start > 0 for layer in cache.kv_layers if layer.window is not None)
    path = saved.save(tmp_path / "chat.kvsession")

    llm = make_llm(loaded, policy, budget)
    loaded_session = load_chat(llm, path)
    assert_same_state(saved, loaded_session)
    assert llm.pool.bytes_used == loaded_session.kv_bytes == llm.pool.physical_nbytes()
    llm.pool.check_integrity()
    for layer in loaded_session.sequence.cache.kv_layers:
        layer.check()
    if policy is not None and "kivi4" in policy:  # compressed blocks were saved as their bytes
        _, tensors = read_session(path)
        assert any(name.endswith(".packed") and t.dtype == torch.uint8 for name, t in tensors.items())
    if policy is not None and "res8" in policy:  # and the block being filled as its own bytes
        _, tensors = read_session(path)
        assert any(name.endswith(".partial") and t.dtype == torch.uint8 for name, t in tensors.items())
        assert not any(name.endswith(".full") for name in tensors)
    # saving what was loaded writes the same header and tensor bytes (the same checksum)
    again = loaded_session.save(tmp_path / "again.kvsession")
    assert metadata(again) == metadata(path)


def metadata(path: Path) -> dict[str, str]:
    with safetensors.safe_open(str(path), "pt") as f:
        return dict(f.metadata())


@pytest.mark.parametrize(("model", "policy", "budget"), CASES, ids=IDS)
def test_continuing_after_load_equals_never_stopping(
    model: str, policy: str | None, budget: str | None, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    loaded: LoadedModel = request.getfixturevalue(model)
    never_stopped = chatted(make_llm(loaded, policy, budget), TURNS[:2])
    path = never_stopped.save(tmp_path / "chat.kvsession")
    resumed = load_chat(make_llm(loaded, policy, budget), path)
    expected = never_stopped.send(TURNS[2], max_new_tokens=NEW_TOKENS)
    got = resumed.send(TURNS[2], max_new_tokens=NEW_TOKENS)
    assert got.token_ids == expected.token_ids
    # only the new turn was computed (plus the last answer's final token)
    assert got.stats.tokens_prefilled == expected.stats.tokens_prefilled
    assert got.stats.tokens_prefilled < got.stats.prompt_tokens // 2
    assert_same_state(never_stopped, resumed)


@pytest.mark.real
def test_real_model_session_continues_exactly(real: LoadedModel, tmp_path: Path) -> None:
    config = {"kv_budget": "50%", "policy": "h2o+kivi4", "block_size": 16}  # evicted and quantized
    never_stopped = LLM(real, **config).chat()
    for message in TURNS[:2]:
        never_stopped.send(message, max_new_tokens=12)
    path = never_stopped.save(tmp_path / "real.kvsession")
    assert any(layer.held < layer.seq_length for layer in never_stopped.sequence.cache.kv_layers)
    resumed = load_chat(LLM(real, **config), path)
    expected = never_stopped.send(TURNS[2], max_new_tokens=12)
    assert resumed.send(TURNS[2], max_new_tokens=12).token_ids == expected.token_ids
    assert_same_state(never_stopped, resumed)


PROCESS_SCRIPT = """
import json, sys
from kvmem import LLM, load_chat
folder, path, turn = sys.argv[1:4]
llm = LLM(folder, kv_budget="16KiB", block_size=4, policy="h2o+kivi4")
session = llm.chat() if turn == "first" else load_chat(llm, path)
result = session.send(sys.argv[4], max_new_tokens=8)
session.save(path)
print(json.dumps({"tokens": result.token_ids, "prefilled": result.stats.tokens_prefilled}))
"""


def test_save_new_process_load_continue(llama: LoadedModel, tmp_path: Path) -> None:
    folder = str(save_folder(llama, tmp_path / "tiny-llama"))
    path = str(tmp_path / "chat.kvsession")

    def turn_in_new_process(which: str, message: str) -> dict[str, list[int] | int]:
        proc = subprocess.run(
            [sys.executable, "-c", PROCESS_SCRIPT, folder, path, which, message],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))

    first = turn_in_new_process("first", TURNS[0])
    second = turn_in_new_process("second", TURNS[1])

    llm = LLM(folder, kv_budget="16KiB", block_size=4, policy="h2o+kivi4")
    with llm.chat() as session:
        one = session.send(TURNS[0], max_new_tokens=8)
        two = session.send(TURNS[1], max_new_tokens=8)
    assert first == {"tokens": one.token_ids, "prefilled": one.stats.tokens_prefilled}
    assert second == {"tokens": two.token_ids, "prefilled": two.stats.tokens_prefilled}


@pytest.fixture
def saved(llama: LoadedModel, tmp_path: Path) -> Path:
    with chatted(make_llm(llama, None, None), TURNS[:1]) as session:
        return session.save(tmp_path / "chat.kvsession")


def assert_refused(llm: LLM, path: Path, error: type[Exception], message: str) -> None:
    """Loading raises ``error`` naming ``message`` and leaves the pool as it was."""
    used, blocks = llm.pool.bytes_used, llm.pool.manager.live_ids()
    with pytest.raises(error, match=message):
        load_chat(llm, path)
    assert (llm.pool.bytes_used, llm.pool.manager.live_ids()) == (used, blocks)
    llm.pool.check_integrity()


def test_missing_file(llama: LoadedModel, tmp_path: Path) -> None:
    with pytest.raises(SessionNotFoundError, match="no saved session") as error:
        load_chat(make_llm(llama, None, None), tmp_path / "nothing.kvsession")
    assert isinstance(error.value, FileNotFoundError)


@pytest.mark.parametrize("keep", [0, 7, 100, 0.5, -1])
def test_truncated_file(saved: Path, llama: LoadedModel, keep: float) -> None:
    data = saved.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    saved.write_bytes(data[:cut])
    assert_refused(make_llm(llama, None, None), saved, CorruptCacheError, "not a readable|damaged")


def test_flipped_byte_in_the_tensors(saved: Path, llama: LoadedModel) -> None:
    data = bytearray(saved.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's bytes: the file still parses
    saved.write_bytes(bytes(data))
    assert_refused(make_llm(llama, None, None), saved, CorruptCacheError, "checksum does not match")


def test_no_flipped_bit_loads(saved: Path, llama: LoadedModel) -> None:
    """Wherever a bit flips (header, metadata, tensors), the file is refused with a typed error."""
    data = saved.read_bytes()
    llm = make_llm(llama, None, None)
    for position in range(0, len(data), max(1, len(data) // 300)):
        damaged = bytearray(data)
        damaged[position] ^= 0x04
        saved.write_bytes(bytes(damaged))
        with pytest.raises((CorruptCacheError, SessionMismatchError)):
            load_chat(llm, saved)
    assert llm.pool.bytes_used == 0
    llm.pool.check_integrity()


@pytest.mark.parametrize(
    "content",
    [b"", b"hello, not a session", bytes(range(256)) * 40],
    ids=["empty", "text", "garbage"],
)
def test_not_a_session_file(tmp_path: Path, llama: LoadedModel, content: bytes) -> None:
    path = tmp_path / "other.kvsession"
    path.write_bytes(content)
    assert_refused(make_llm(llama, None, None), path, CorruptCacheError, "not a readable kvmem session")


def test_a_safetensors_file_that_is_not_a_session(tmp_path: Path, llama: LoadedModel) -> None:
    path = tmp_path / "weights.safetensors"
    path.write_bytes(safetensors.torch.save({"w": torch.zeros(3)}, {"format": "pt"}))
    assert_refused(make_llm(llama, None, None), path, CorruptCacheError, "not a readable kvmem session")


def test_other_model(saved: Path) -> None:
    other = tiny_llama(seed=1)  # same shape, other weights
    assert_refused(make_llm(other, None, None), saved, SessionMismatchError, "saved with model tiny-llama")


def test_other_dtype_is_named_as_such(saved: Path, llama: LoadedModel) -> None:
    model = copy.deepcopy(llama.model).to(torch.bfloat16)
    bf16 = LoadedModel(
        llama.name, model, llama.tokenizer, ModelSpec.from_config(model.config, torch.bfloat16), False
    )
    message = "saved with dtype float32, but this LLM runs bfloat16; resume it with --dtype float32"
    assert_refused(make_llm(bf16, None, None), saved, SessionMismatchError, message)


@pytest.mark.parametrize(
    ("policy", "block_size", "message"),
    [
        ("kivi4", 4, "saved with policy none, but this LLM has kivi4; resume it without --policy"),
        (None, 8, "saved with block size 4, but this LLM has 8; resume it with --block-size 4"),
    ],
)
def test_other_policy_or_block_size(
    saved: Path, llama: LoadedModel, policy: str | None, block_size: int, message: str
) -> None:
    assert_refused(LLM(llama, block_size=block_size, policy=policy), saved, SessionMismatchError, message)


def test_policy_named_in_another_order_is_the_same(llama: LoadedModel, tmp_path: Path) -> None:
    with chatted(make_llm(llama, "snapkv+kivi4", "16KiB"), TURNS[:1]) as session:
        path = session.save(tmp_path / "chat.kvsession")
    with load_chat(make_llm(llama, "kivi4+snapkv", "16KiB"), path) as resumed:
        assert resumed.turns == 1


def test_other_format_version(saved: Path, llama: LoadedModel) -> None:
    header, tensors = read_session(saved)
    header["format"] = 99
    text = json.dumps(header)
    metadata = {"kvmem.session": text, "kvmem.sha256": session_file._checksum(text, tensors)}
    saved.write_bytes(safetensors.torch.save(tensors, metadata))
    assert_refused(
        make_llm(llama, None, None), saved, SessionMismatchError, "format 99; this kvmem reads format 2"
    )


def test_session_larger_than_the_budget(saved: Path, llama: LoadedModel) -> None:
    needed = read_session(saved)[1]["0.full"].numel() * 4 * 2  # two layers of float32 blocks
    llm = make_llm(llama, None, f"{needed + 1024}")
    other = chatted(llm, ["Hi"])  # holds a few blocks: now the session cannot fit
    assert llm.pool.bytes_free is not None and llm.pool.bytes_free < needed
    assert_refused(llm, saved, KVBudgetError, "the saved session needs")
    other.send("Ok", max_new_tokens=2)  # the pool is still usable
    other.close()
    with load_chat(llm, saved) as resumed:  # and with room freed, it loads
        assert llm.pool.bytes_used == resumed.kv_bytes == needed


def test_empty_session_round_trip(llama: LoadedModel, tmp_path: Path) -> None:
    llm = make_llm(llama, None, None)
    with llm.chat(system="Be brief.") as fresh:
        path = fresh.save(tmp_path / "empty.kvsession")
    with load_chat(llm, path) as resumed, llm.chat(system="Be brief.") as never_saved:
        assert resumed.messages == [{"role": "system", "content": "Be brief."}] and resumed.kv_bytes == 0
        assert (
            resumed.send("Hi", max_new_tokens=4).token_ids
            == never_saved.send("Hi", max_new_tokens=4).token_ids
        )


def test_write_is_atomic(saved: Path, llama: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    before = saved.read_bytes()
    session = chatted(make_llm(llama, None, None), TURNS[:2])

    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(session_file.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        session.save(saved)
    assert saved.read_bytes() == before  # the old session is intact
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]  # no temporary file left
    monkeypatch.undo()
    session.save(saved)
    assert read_session(saved)[0]["turns"] == 2
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]


def test_session_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMEM_CACHE_DIR", str(tmp_path))
    assert session_path("work") == tmp_path / "sessions" / "work.kvsession"
    assert session_path("work.kvsession") == Path("work.kvsession")
    assert session_path("notes/work") == Path("notes/work")
    assert session_path("~/work.bin") == Path.home() / "work.bin"
