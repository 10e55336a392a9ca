"""``write_atomic``: a file is replaced whole or not at all (temporary file, fsync, rename)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, prefix: str, suffix: str, sync_folder: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary file ``<prefix>…<suffix>`` in the same folder.

    Readers see the old file, the new one, or none; concurrent writers leave one whole file. With
    ``sync_folder`` the rename itself is made durable too, where the OS allows.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync_folder:
        with contextlib.suppress(OSError):
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
