"""Chat sessions saved to one file and loaded back, so a conversation resumes without recomputing.

The file is safetensors: the cache's tensors (``kvmem.tiers.snapshot``) and, in its string
metadata, a JSON header — format version, the model's identity and name, the policy, block size
and dtype, the conversation (messages, token ids, turns), the cache's table state — and a sha256
of the header and every tensor's name, dtype, shape and bytes. Loading checks, in order: that the
file parses (else ``CorruptCacheError``), its format version, the checksum (``CorruptCacheError``),
then that it was made with this model, policy, block size and dtype (``SessionMismatchError``,
naming both), and that the pool can hold it (``KVBudgetError``, the pool left as it was). The
budget is recorded but not checked: a session resumes under any budget that holds its blocks.

Writes are atomic: a temporary file in the same folder, fsync, then ``os.replace``; a reader
sees the old session or the new one, never a mixture.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch
from safetensors import SafetensorError

from kvmem.engine.chat import ChatSession
from kvmem.errors import CorruptCacheError, SessionMismatchError, SessionNotFoundError
from kvmem.model.loader import cache_dir
from kvmem.tiers.atomic import write_atomic
from kvmem.tiers.snapshot import restore, snapshot

if TYPE_CHECKING:
    from kvmem.engine.llm import LLM

FORMAT = 2  # 2: layer kinds (scorer state per layer, block lists per part)
SUFFIX = ".kvsession"
_HEADER = "kvmem.session"
_CHECKSUM = "kvmem.sha256"


def session_path(name: str | os.PathLike[str]) -> Path:
    """A bare name (no folder, no suffix) lives in ``cache_dir()/sessions/NAME.kvsession``;
    anything else is a path."""
    text = os.fspath(name)
    path = Path(text).expanduser()
    if os.sep in text or "/" in text or path.suffix:
        return path
    return cache_dir() / "sessions" / f"{text}{SUFFIX}"


def save_session(session: ChatSession, path: str | os.PathLike[str]) -> Path:
    """Write ``session`` (conversation and KV state) to ``path`` atomically; return the path."""
    llm = session.llm
    state = snapshot(session.sequence.cache)
    header = {
        "format": FORMAT,
        "model": llm.config.model,
        "identity": llm.loaded.identity,
        "policy": _policy_name(llm),
        "kv_budget": None if llm.config.kv_budget is None else str(llm.config.kv_budget),
        "block_size": llm.pool.block_size,
        "dtype": str(llm.spec.dtype).removeprefix("torch."),
        "messages": session.messages,
        "token_ids": session.sequence.token_ids,
        "turns": session.turns,
        "cache_salt": session.cache_salt,
        "cache": state.header,
    }
    text = json.dumps(header, separators=(",", ":"))
    metadata = {_HEADER: text, _CHECKSUM: _checksum(text, state.tensors)}
    target = Path(path)
    _write_atomic(target, safetensors.torch.save(state.tensors, metadata))
    return target


def load_chat(llm: LLM, path: str | os.PathLike[str]) -> ChatSession:
    """A new ``ChatSession`` of ``llm`` holding the saved conversation; its blocks are allocated in
    ``llm.pool``. Raises ``SessionNotFoundError``, ``CorruptCacheError``, ``SessionMismatchError``
    or ``KVBudgetError``; on any of them the pool holds what it held before."""
    source = Path(path)
    header, tensors = read_session(source)
    check_compatible(header, llm, source)
    salt = header.get("cache_salt")
    session = ChatSession(llm, cache_salt=None if salt is None else str(salt))
    try:
        with _corrupt_if_malformed(source):
            session.messages = [
                {"role": str(m["role"]), "content": str(m["content"])} for m in header["messages"]
            ]
            session.turns = int(header["turns"])
            session.sequence.token_ids = [int(t) for t in header["token_ids"]]
            restore(session.sequence.cache, header["cache"], tensors, llm.loaded.model.device)
            if session.sequence.num_pending < 0:
                raise CorruptCacheError(f"{source}: the cache holds more tokens than the conversation")
    except BaseException:
        session.close()
        raise
    return session


def read_session(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The header and tensors of a session file, checksum verified."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SessionNotFoundError(f"no saved session at {path}") from None
    try:
        (size,) = struct.unpack("<Q", data[:8])
        metadata = json.loads(data[8 : 8 + size])["__metadata__"]
        text, checksum = metadata[_HEADER], metadata[_CHECKSUM]
        header = json.loads(text)
        tensors = safetensors.torch.load(data)
    except (struct.error, ValueError, KeyError, TypeError, SafetensorError) as exc:
        # whatever a damaged or foreign file makes the parsers raise
        raise CorruptCacheError(
            f"{path} is not a readable kvmem session file ({type(exc).__name__}); delete it or start anew"
        ) from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        version = header.get("format") if isinstance(header, dict) else None
        raise SessionMismatchError(
            f"{path} is a session file of format {version!r}; this kvmem reads format {FORMAT}"
        )
    if _checksum(text, tensors) != checksum:
        raise CorruptCacheError(f"{path} is damaged: its checksum does not match its contents")
    return header, tensors


def check_compatible(header: dict[str, Any], llm: LLM, path: Path) -> None:
    """Raise ``SessionMismatchError`` unless the session was made by this model and configuration."""
    made = f"session {path} was saved with"
    # the identity digests the dtype too: a dtype that differs is said as such, not as another model
    dtype, saved_dtype = str(llm.spec.dtype).removeprefix("torch."), header.get("dtype")
    if saved_dtype != dtype:
        raise SessionMismatchError(
            f"{made} dtype {saved_dtype}, but this LLM runs {dtype}; resume it with --dtype {saved_dtype} "
            f"(dtype={saved_dtype!r})"
        )
    if header.get("identity") != llm.loaded.identity:
        raise SessionMismatchError(
            f"{made} model {header.get('model')} (identity {header.get('identity')}), but this LLM runs "
            f"{llm.config.model} (identity {llm.loaded.identity}); resume it with the model it was "
            "saved with (--model)"
        )
    saved, policy = header.get("policy"), _policy_name(llm)
    if saved != policy:
        hint = "without --policy" if saved is None else f"--policy {saved}"
        raise SessionMismatchError(
            f"{made} policy {saved or 'none'}, but this LLM has {policy or 'none'}; resume it {hint}"
        )
    if header.get("block_size") != llm.pool.block_size:
        raise SessionMismatchError(
            f"{made} block size {header.get('block_size')}, but this LLM has {llm.pool.block_size}; "
            f"resume it with --block-size {header.get('block_size')}"
        )


def _policy_name(llm: LLM) -> str | None:
    """The policy in canonical form (``kivi4+snapkv`` and ``snapkv+kivi4`` are one policy)."""
    return None if llm.policy is None else llm.policy.name


def _checksum(header: str, tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(header.encode())
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"\0{name}:{tensor.dtype}:{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


@contextlib.contextmanager
def _corrupt_if_malformed(path: Path) -> Iterator[None]:
    """A header with a valid checksum but missing or mistyped fields is still a bad file."""
    try:
        yield
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptCacheError(f"{path}: malformed session ({type(exc).__name__}: {exc})") from None


def _write_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, data, prefix=f".{path.name}.", suffix=".tmp")
