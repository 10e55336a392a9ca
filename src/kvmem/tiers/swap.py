"""``SwapSpace``: where a preempted sequence's KV state waits, on disk, until it runs again.

A swap writes the sequence's cache with the snapshot code (``kvmem.tiers.snapshot``: every block
as it is held, quantized ones still packed, plus the scorer state) to one safetensors file in a
private folder, and frees its blocks; a swap-in restores it bit for bit into the sequence's
empty cache, so the resumed sequence continues exactly as if it had never stopped. Files are
deleted when read back or discarded, and the folder with the swap space.

Why swap rather than drop and recompute: recomputing a prompt on this kind of machine costs
seconds (a 2k-token prefill of SmolLM2 takes ~3 s on 2 cores) where writing its blocks costs a
fraction of that, and a recomputed cache is not bit-identical to the one decoding built (chunked
prefill sums in another order; an eviction policy's choices depend on the chunking), so the
tokens that follow could differ. Swapped state is exact.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import safetensors.torch

from kvmem.errors import CorruptCacheError
from kvmem.model.cache import KVMemCache
from kvmem.tiers.snapshot import restore, snapshot

_HEADER = "kvmem.swap"


class SwapHandle(NamedTuple):
    """A swapped cache: its file, and the pool bytes a swap-in allocates."""

    path: Path
    nbytes: int


class SwapSpace:
    """A folder of swapped caches under ``parent`` (created on first use, removed by ``close``)."""

    def __init__(self, parent: Path) -> None:
        self.parent = parent
        self._folder: Path | None = None
        self._count = 0
        self.swaps_out = 0
        self.swaps_in = 0
        self.bytes_written = 0

    @property
    def folder(self) -> Path:
        if self._folder is None:
            self.parent.mkdir(parents=True, exist_ok=True)
            self._folder = Path(tempfile.mkdtemp(prefix="swap-", dir=self.parent))
        return self._folder

    def swap_out(self, cache: KVMemCache) -> SwapHandle:
        """Write ``cache``'s state to a file and release its blocks (it is empty afterwards).

        Raises what ``snapshot`` raises for a cache it cannot save (offloading layers), and
        ``OSError`` if the file cannot be written; the cache is unchanged then."""
        state = snapshot(cache)
        nbytes = cache.nbytes
        self._count += 1
        path = self.folder / f"{self._count}.kvswap"
        data = safetensors.torch.save(state.tensors, {_HEADER: json.dumps(state.header)})
        path.write_bytes(data)
        cache.release()
        self.swaps_out += 1
        self.bytes_written += len(data)
        return SwapHandle(path, nbytes)

    def swap_in(self, handle: SwapHandle, cache: KVMemCache) -> None:
        """Restore a swapped state into the empty ``cache`` and delete its file. Raises
        ``CorruptCacheError`` if the file is gone or unreadable, ``KVBudgetError`` if the pool
        cannot hold it (the file is kept then)."""
        try:
            data = handle.path.read_bytes()
            header = json.loads(_metadata(data)[_HEADER])
            tensors = safetensors.torch.load(data)
        except (OSError, ValueError, KeyError) as exc:
            raise CorruptCacheError(f"swapped KV state {handle.path} is unreadable: {exc}") from None
        restore(cache, header, tensors, cache.device)
        handle.path.unlink(missing_ok=True)
        self.swaps_in += 1

    def discard(self, handle: SwapHandle) -> None:
        handle.path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


def _metadata(data: bytes) -> dict[str, str]:
    size = int.from_bytes(data[:8], "little")
    return dict(json.loads(data[8 : 8 + size]).get("__metadata__", {}))
