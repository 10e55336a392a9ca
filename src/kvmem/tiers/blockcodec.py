"""One stored KV block as bytes: safetensors with a header that says what the tensors are.

The same bytes go to a block file (``DiskTier``) and to a Redis value (``RedisTier``). The header
(safetensors metadata) carries the format version, the key the block was stored under, a sha256
of the tensors, and what the writer adds (model identity, policy, dtype). ``decode`` returns None
for anything that is not exactly what was written under that key — truncated, bit-flipped, another
format, another key, or a header field that differs from what the reader expects (a block of
another model under the right key): the caller counts a miss and recomputes.
"""

from __future__ import annotations

import hashlib
import json
import struct

import torch
from safetensors.torch import load, save

FORMAT = "kvmem-block-1"


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def encode(key: bytes, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> bytes:
    """The block's bytes: ``tensors`` (moved to the CPU) and a header naming ``key``."""
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    header = {**(meta or {}), "format": FORMAT, "key": key.hex(), "sha256": checksum(tensors)}
    return save(tensors, metadata=header)


def header(data: bytes) -> dict[str, str] | None:
    """The header of encoded bytes without reading the tensors (None if unreadable)."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8 : 8 + n]).get("__metadata__", {})
    except Exception:
        return None
    return dict(meta) if isinstance(meta, dict) else None


def decode(
    key: bytes, data: bytes, expect: dict[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """The tensors and header stored as ``data`` under ``key``, or None if they are not exactly
    that (see the module docstring); ``expect``: header fields that must match."""
    meta = header(data)
    if meta is None or meta.get("format") != FORMAT or meta.get("key") != key.hex():
        return None
    if any(meta.get(field) != value for field, value in (expect or {}).items()):
        return None
    try:
        tensors = load(data)
    except Exception:  # truncated or damaged: any unreadable value is a miss, never a crash
        return None
    if meta.get("sha256") != checksum(tensors):
        return None
    return tensors, meta
