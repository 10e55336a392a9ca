"""Chained block hashes: a full block of tokens is named by everything that determines its KV.

A block's keys and values depend on every token before it, on the model, on the policy that
stored them (a KIVI block is not a float block) and on the block size. So the hash of block ``j``
digests the hash of block ``j - 1`` and block ``j``'s token ids; the chain starts from a root that
digests the model identity, the policy, the block size and an optional per-tenant salt. Equal
hashes mean interchangeable blocks; a different salt makes every hash different. Plain Python.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

DIGEST_SIZE = 16  # bytes: collisions among 2**64 blocks are ~2**-1 likely, far beyond any cache


def root_hash(model_identity: str, policy: str | None, block_size: int, salt: str | None = None) -> bytes:
    """The chain's start for one model, policy, block size and tenant."""
    h = hashlib.blake2b(digest_size=DIGEST_SIZE, person=b"kvmem-root")
    for part in (model_identity, policy or "", str(block_size), salt or ""):
        data = part.encode()
        h.update(struct.pack("<I", len(data)) + data)  # length-prefixed: no ambiguity between parts
    return h.digest()


def chain_hash(previous: bytes, tokens: Sequence[int]) -> bytes:
    """The hash of a block holding ``tokens`` after the block hashed ``previous``."""
    h = hashlib.blake2b(previous, digest_size=DIGEST_SIZE, person=b"kvmem-block")
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return h.digest()


def block_hashes(
    root: bytes, token_ids: Sequence[int], block_size: int, start: int = 0, previous: bytes | None = None
) -> list[bytes]:
    """Hashes of the full blocks ``start, start + 1, …`` of ``token_ids`` (a partial block has none).

    ``previous`` is block ``start - 1``'s hash (the root when ``start == 0``).
    """
    hashes: list[bytes] = []
    prev = root if start == 0 else previous
    assert prev is not None, "block_hashes from a later block needs the previous block's hash"
    for j in range(start, len(token_ids) // block_size):
        prev = chain_hash(prev, token_ids[j * block_size : (j + 1) * block_size])
        hashes.append(prev)
    return hashes
