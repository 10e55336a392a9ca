"""``kvmem cache ls|stats|clear``: the disk tier's block files (and saved sessions) from the shell."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from kvmem.errors import KVMemError, format_bytes


class CacheUsageError(KVMemError, ValueError):
    """A ``kvmem cache`` option that is out of range or does not apply."""


def default_dir() -> Path:
    """Where ``--disk-cache`` without a folder keeps block files: ``<cache_dir>/kv``."""
    from kvmem.model.loader import cache_dir

    return cache_dir() / "kv"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cache = sub.add_parser(
        "cache",
        help="the disk tier: list, summarise or clear cached KV block files",
        description="KV blocks written by --disk-cache live in one file per token block, named by a "
        "hash of the model, policy and every token before it. Damaged files are detected on read and "
        "recomputed; clearing only costs recomputation later.",
    )
    cache.add_argument("action", choices=("ls", "stats", "clear"), help="what to do")
    cache.add_argument("--dir", type=Path, default=None, help=f"the cache folder (default {default_dir()})")
    cache.add_argument(
        "--older-than",
        default=None,
        metavar="DAYS",
        help="clear: only files unused for this many days",
    )


def cmd_cache(args: argparse.Namespace) -> int:
    from kvmem.tiers.disk import DiskTier

    older = older_than_seconds(args.older_than)
    if older is not None and args.action != "clear":
        raise CacheUsageError(f"--older-than applies to `kvmem cache clear` only, not {args.action}")
    folder = args.dir if args.dir is not None else default_dir()
    if folder.exists() and not folder.is_dir():
        raise CacheUsageError(f"--dir {folder} is a file, not a cache folder")
    if args.dir is not None and not folder.is_dir():
        raise FileNotFoundError(f"no such cache folder: {folder}")
    if not folder.is_dir():  # the default folder, never used yet: nothing to show, nothing created
        print(f"{folder}: no disk cache yet (kvmem generate --disk-cache creates it)")
        return 0
    disk = DiskTier(folder)
    files = disk.files()
    if args.action == "ls":
        now = time.time()
        for f in files:
            print(f"{f.key}  {format_bytes(f.nbytes):>11}  used {_age(now - f.last_used)} ago")
        return 0
    if args.action == "stats":
        total = sum(f.nbytes for f in files)
        print(f"{folder}: {len(files)} block files, {format_bytes(total)}")
        sessions = folder.parent / "sessions"
        if args.dir is None and sessions.is_dir():
            saved = list(sessions.glob("*.kvsession"))
            size = sum(p.stat().st_size for p in saved)
            print(f"{sessions}: {len(saved)} saved sessions, {format_bytes(size)}")
        return 0
    deleted = disk.clear(older)
    print(f"deleted {deleted} of {len(files)} block files from {folder}")
    return 0


def older_than_seconds(days: str | None) -> float | None:
    """``--older-than DAYS`` in seconds (None: not given); refuses what is not a number of days >= 0,
    so a typo never widens ``clear`` to every file."""
    if days is None:
        return None
    try:
        value = float(days)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise CacheUsageError(f"--older-than must be a number of days >= 0 (such as 7 or 0.5), got {days!r}")
    return value * 86400


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"
