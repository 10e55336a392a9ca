"""``DiskTier``: KV blocks in files named by their hash, checked on every read, under a size cap.

One file per token block (every layer's pool block for those tokens), in ``blockcodec``'s format —
tensors as stored in RAM, so quantized blocks stay packed bytes, and a header with its key, a
format tag and a sha256 of its tensors. Writes go to a temporary file in the same folder, are
fsynced, then renamed over the target: a reader sees the old file, the new one, or none, never
half a file, and concurrent writers of one key leave one valid file. A file that is missing,
truncated, bit-flipped or not ours is a miss: it is counted, removed, and the caller recomputes.
Over ``max_bytes`` the least recently used files are deleted (a read refreshes a file's time).
A write that fails (disk full, read-only folder) costs only a later recomputation; the caller
reports it with ``write_failed``, which counts it and warns once, on the ``kvmem.tiers`` logger.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from kvmem.errors import KVMemError
from kvmem.tiers import blockcodec
from kvmem.tiers.atomic import write_atomic

SUFFIX = ".kvblock"
log = logging.getLogger("kvmem.tiers")


class DiskFolderError(KVMemError, ValueError):
    """The disk cache folder is a file (or lies under one), or cannot be created."""


@dataclass
class DiskStats:
    """What the tier did since it was opened (this process)."""

    hits: int = 0
    misses: int = 0
    corrupt: int = 0  # files found unreadable or not matching their checksum: removed, recomputed
    writes: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    evicted: int = 0  # files deleted to stay under the size cap
    write_errors: int = 0  # blocks not written (disk full, read-only): recomputed when needed


class DiskFile(NamedTuple):
    key: str  # hex
    path: Path
    nbytes: int
    last_used: float  # seconds since the epoch


def check_folder(folder: str | Path) -> Path:
    """``folder`` as a path; raises ``DiskFolderError`` if it, or a folder above it, is a file.
    Creates nothing."""
    path = Path(folder).expanduser()
    for above in (path, *path.parents):
        if above.exists():
            if not above.is_dir():
                what = "is a file, not a folder" if above == path else f"cannot be made: {above} is a file"
                raise DiskFolderError(
                    f"disk cache folder {path} {what}; give a folder (disk_cache= / --disk-cache)"
                )
            break
    return path


class DiskTier:
    def __init__(self, folder: str | Path, max_bytes: int | None = None) -> None:
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"the disk cache size cap must be positive, got {max_bytes}")
        self.folder = check_folder(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DiskFolderError(f"disk cache folder {self.folder} cannot be created: {_why(exc)}") from None
        self.max_bytes = max_bytes
        self.stats = DiskStats()
        self.failing = False  # the last write failed (a full disk, a read-only folder)

    def write_failed(self, error: OSError) -> None:
        """Count a block that could not be written; the first one is warned about, once."""
        self.stats.write_errors += 1
        if self.stats.write_errors == 1:
            log.warning(
                "disk cache %s cannot be written (%s): its blocks will be recomputed, not reused",
                self.folder,
                _why(error),
            )
        self.failing = True

    def path(self, key: bytes) -> Path:
        name = key.hex()
        return self.folder / name[:2] / (name + SUFFIX)

    def __contains__(self, key: bytes) -> bool:
        return self.path(key).is_file()

    def put(self, key: bytes, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> int:
        """Write ``tensors`` under ``key`` atomically; bytes written."""
        data = blockcodec.encode(key, tensors, meta)
        # a lost block file is only a recomputation: no folder fsync on this per-block path
        write_atomic(self.path(key), data, prefix=".tmp-", suffix=SUFFIX, sync_folder=False)
        self.stats.writes += 1
        self.stats.bytes_written += len(data)
        self.failing = False
        if self.max_bytes is not None:
            self.enforce_cap()
        return len(data)

    def get(
        self, key: bytes, expect: dict[str, str] | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """The tensors and metadata stored under ``key``, or None (missing, corrupt or not matching
        ``expect``: removed). See ``blockcodec.decode``."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # never written, or deleted meanwhile (another process, the cap)
            self.stats.misses += 1
            return None
        except OSError:
            data = b""
        found = blockcodec.decode(key, data, expect)
        if found is None:
            self.stats.corrupt += 1
            self.stats.misses += 1
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        self.stats.hits += 1
        self.stats.bytes_read += len(data)
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: last to go under the cap
        return found

    def files(self) -> list[DiskFile]:
        """Every block file, least recently used first."""
        found = []
        for path in self.folder.glob(f"??/*{SUFFIX}"):
            if path.name.startswith(".tmp-"):
                continue
            with contextlib.suppress(OSError):  # another process may delete it meanwhile
                st = path.stat()
                found.append(DiskFile(path.name.removesuffix(SUFFIX), path, st.st_size, st.st_mtime))
        return sorted(found, key=lambda f: f.last_used)

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files())

    def enforce_cap(self) -> int:
        """Delete least recently used files until the folder is under ``max_bytes``; files deleted."""
        if self.max_bytes is None:
            return 0
        files = self.files()
        total, deleted = sum(f.nbytes for f in files), 0
        for f in files:
            if total <= self.max_bytes:
                break
            with contextlib.suppress(OSError):
                f.path.unlink()
                deleted += 1
            total -= f.nbytes
        self.stats.evicted += deleted
        return deleted

    def clear(self, older_than_s: float | None = None) -> int:
        """Delete block files (only those unused for ``older_than_s`` if given) and stale temporary
        files; files deleted. A negative or NaN ``older_than_s`` raises ``ValueError`` (it would
        delete every file)."""
        if older_than_s is not None and not older_than_s >= 0:
            raise ValueError(f"older_than_s must be >= 0 seconds or None, got {older_than_s}")
        now, deleted = time.time(), 0
        for f in self.files():
            if older_than_s is None or now - f.last_used > older_than_s:
                with contextlib.suppress(OSError):
                    f.path.unlink()
                    deleted += 1
        for tmp in self.folder.glob(f"??/.tmp-*{SUFFIX}"):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > 3600:  # a writer that died mid-write
                    tmp.unlink()
        return deleted


def _why(error: OSError) -> str:
    """An OS error without the temporary file's name: ``[Errno 28] No space left on device``."""
    return f"[Errno {error.errno}] {error.strerror}" if error.strerror else str(error)
