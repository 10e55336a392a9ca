"""Session files: a conversation and its cache's KV state in one file, so a chat resumes without
recomputing. This module knows the file, not the engine: the engine hands it what to write (the
``SessionOrigin`` it runs with, the ``Conversation``, the cache) and rebuilds a chat from what it
reads (``kvmem.load_chat``).

The file is safetensors: the cache's tensors (``kvmem.tiers.snapshot``) and, in its string
metadata, a JSON header — format version, the model's identity and name, the policy, block size
and dtype, the conversation (messages, token ids, turns), the cache's table state — and a sha256
of the header and every tensor's name, dtype, shape and bytes. Opening checks, in order: that the
file parses (else ``CorruptCacheError``), its format version, the checksum (``CorruptCacheError``),
then that it was made with this model, policy, block size and dtype (``SessionMismatchError``,
naming both); restoring checks that the pool can hold it (``KVBudgetError``, the pool left as it
was). The budget is recorded but not checked: a session resumes under any budget that holds its
blocks.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import safetensors.torch
import torch
from safetensors import SafetensorError

from kvmem.errors import CorruptCacheError, SessionMismatchError, SessionNotFoundError
from kvmem.model.cache import KVMemCache
from kvmem.model.loader import cache_dir
from kvmem.tiers.atomic import write_atomic
from kvmem.tiers.snapshot import restore, snapshot

FORMAT = 2  # 2: layer kinds (scorer state per layer, block lists per part)
SUFFIX = ".kvsession"
_HEADER = "kvmem.session"
_CHECKSUM = "kvmem.sha256"


@dataclass(frozen=True)
class SessionOrigin:
    """What a session's KV state was made with. A file opens only where ``identity`` (which digests
    the weights and dtype), ``dtype``, ``policy`` (canonical name) and ``block_size`` match;
    ``model`` and ``kv_budget`` are recorded for messages."""

    model: str
    identity: str
    policy: str | None
    kv_budget: str | None
    block_size: int
    dtype: str  # "float32", "bfloat16", …


class Conversation(NamedTuple):
    """A chat's state besides its cache: what was said, the tokens the cache holds (and any not yet
    computed), the turns taken and the tenant's prefix-cache salt."""

    messages: list[dict[str, str]]
    token_ids: list[int]
    turns: int
    cache_salt: str | None


class SavedSession(NamedTuple):
    """An opened session file, checked against an origin: its conversation and its cache's state."""

    path: Path
    conversation: Conversation
    cache: dict[str, Any]  # the snapshot header
    tensors: dict[str, torch.Tensor]


def session_path(name: str | os.PathLike[str]) -> Path:
    """A bare name (no folder, no suffix) lives in ``cache_dir()/sessions/NAME.kvsession``;
    anything else is a path."""
    text = os.fspath(name)
    path = Path(text).expanduser()
    if os.sep in text or "/" in text or path.suffix:
        return path
    return cache_dir() / "sessions" / f"{text}{SUFFIX}"


def write_session(
    path: str | os.PathLike[str], origin: SessionOrigin, conversation: Conversation, cache: KVMemCache
) -> Path:
    """Write ``conversation`` and ``cache``'s KV state, made with ``origin``, to ``path`` atomically;
    return the path. The cache is only read."""
    state = snapshot(cache)
    header = {
        "format": FORMAT,
        "model": origin.model,
        "identity": origin.identity,
        "policy": origin.policy,
        "kv_budget": origin.kv_budget,
        "block_size": origin.block_size,
        "dtype": origin.dtype,
        "messages": conversation.messages,
        "token_ids": conversation.token_ids,
        "turns": conversation.turns,
        "cache_salt": conversation.cache_salt,
        "cache": state.header,
    }
    text = json.dumps(header, separators=(",", ":"))
    metadata = {_HEADER: text, _CHECKSUM: _checksum(text, state.tensors)}
    target = Path(path)
    write_atomic(target, safetensors.torch.save(state.tensors, metadata), f".{target.name}.", ".tmp")
    return target


def open_session(path: str | os.PathLike[str], origin: SessionOrigin) -> SavedSession:
    """The session at ``path``, made with ``origin``. Raises ``SessionNotFoundError``,
    ``CorruptCacheError`` or ``SessionMismatchError``; reads only."""
    source = Path(path)
    header, tensors = read_session(source)
    check_compatible(header, origin, source)
    with _corrupt_if_malformed(source):
        salt = header.get("cache_salt")
        conversation = Conversation(
            [{"role": str(m["role"]), "content": str(m["content"])} for m in header["messages"]],
            [int(t) for t in header["token_ids"]],
            int(header["turns"]),
            None if salt is None else str(salt),
        )
        state = header["cache"]
        if not isinstance(state, dict):
            raise TypeError("the cache state is not an object")
    return SavedSession(source, conversation, state, tensors)


def restore_session(saved: SavedSession, cache: KVMemCache, device: torch.device) -> None:
    """Fill the empty ``cache`` with the saved KV state, its blocks allocated in ``cache.pool``.
    Raises ``KVBudgetError``, ``SessionMismatchError`` or ``CorruptCacheError``; on any of them the
    cache holds nothing."""
    with _corrupt_if_malformed(saved.path):
        restore(cache, saved.cache, saved.tensors, device)
    if cache.num_tokens > len(saved.conversation.token_ids):
        cache.release()
        raise CorruptCacheError(f"{saved.path}: the cache holds more tokens than the conversation")


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


def check_compatible(header: dict[str, Any], origin: SessionOrigin, path: Path) -> None:
    """Raise ``SessionMismatchError`` unless the session was made with ``origin``'s model and
    configuration."""
    made = f"session {path} was saved with"
    # the identity digests the dtype too: a dtype that differs is said as such, not as another model
    saved_dtype = header.get("dtype")
    if saved_dtype != origin.dtype:
        raise SessionMismatchError(
            f"{made} dtype {saved_dtype}, but this LLM runs {origin.dtype}; resume it with --dtype "
            f"{saved_dtype} (dtype={saved_dtype!r})"
        )
    if header.get("identity") != origin.identity:
        raise SessionMismatchError(
            f"{made} model {header.get('model')} (identity {header.get('identity')}), but this LLM runs "
            f"{origin.model} (identity {origin.identity}); resume it with the model it was "
            "saved with (--model)"
        )
    saved, policy = header.get("policy"), origin.policy
    if saved != policy:
        hint = "without --policy" if saved is None else f"--policy {saved}"
        raise SessionMismatchError(
            f"{made} policy {saved or 'none'}, but this LLM has {policy or 'none'}; resume it {hint}"
        )
    if header.get("block_size") != origin.block_size:
        raise SessionMismatchError(
            f"{made} block size {header.get('block_size')}, but this LLM has {origin.block_size}; "
            f"resume it with --block-size {header.get('block_size')}"
        )


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
