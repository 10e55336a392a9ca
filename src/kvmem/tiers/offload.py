"""``OffloadStore``: the folder where an offloading sequence's old blocks go, shared by its forks.

It is the ``BlockStore`` an ``OffloadLayer`` is given: the disk tier's checked file format in a
folder of its own under ``$KVMEM_OFFLOAD_DIR`` (else ``<kvmem cache folder>/offload``), removed
when the last sequence using it is released.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from kvmem.model.loader import cache_dir
from kvmem.tiers.disk import DiskTier


def offload_dir() -> Path:
    """Where offloaded blocks go: ``$KVMEM_OFFLOAD_DIR``, else ``<kvmem cache folder>/offload``."""
    env = os.environ.get("KVMEM_OFFLOAD_DIR")
    return Path(env).expanduser() if env else cache_dir() / "offload"


class OffloadStore:
    """A folder of offloaded blocks shared by a sequence and its forks; removed with the last."""

    def __init__(self, parent: Path | None = None) -> None:
        parent = offload_dir() if parent is None else parent
        parent.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="seq-", dir=parent))
        self.disk = DiskTier(self.folder)
        self.users = 1

    @property
    def where(self) -> str:
        return str(self.folder)

    def put(self, key: bytes, tensors: dict[str, torch.Tensor]) -> None:
        self.disk.put(key, tensors)

    def get(self, key: bytes) -> dict[str, torch.Tensor] | None:
        found = self.disk.get(key)
        return None if found is None else found[0]

    def share(self) -> None:
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            shutil.rmtree(self.folder, ignore_errors=True)
