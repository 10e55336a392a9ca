"""The disk tier's files: exact round trips, corruption detected and removed, atomic writes, the cap."""

import errno
import os
import threading
from pathlib import Path

import pytest
import torch

from kvmem.engine.config import EngineConfig
from kvmem.tiers import disk as disk_module
from kvmem.tiers.disk import DiskFolderError, DiskTier


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.0": torch.randn(2, 3, 4, 8, generator=g),
        "layer.2": torch.randint(0, 256, (123,), dtype=torch.uint8, generator=g),  # a packed block
    }


def test_round_trip_is_exact(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path)
    key = bytes(range(16))
    written = disk.put(key, _tensors(0), {"depth": "3"})
    assert key in disk and disk.path(key).stat().st_size == written
    found = disk.get(key)
    assert found is not None
    tensors, meta = found
    assert meta["depth"] == "3"
    for name, t in _tensors(0).items():
        assert torch.equal(tensors[name], t) and tensors[name].dtype == t.dtype
    assert disk.stats.hits == 1 and disk.stats.corrupt == 0


def _corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flipped":  # one bit in the tensor data, far from the header
        data[-10] ^= 0x01
        path.write_bytes(bytes(data))
    elif how == "header":
        data[12] ^= 0x20
        path.write_bytes(bytes(data))
    elif how == "garbage":
        path.write_bytes(b"not a block at all")
    elif how == "deleted":
        path.unlink()


def test_damaged_files_are_misses_counted_and_removed(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path)
    hows = ["truncated", "flipped", "header", "garbage", "deleted"]
    for i, how in enumerate(hows):
        key = bytes([i]) * 16
        disk.put(key, _tensors(i))
        _corrupt(disk.path(key), how)
        assert disk.get(key) is None, how
        assert not disk.path(key).exists()
    assert disk.stats.corrupt == 4 and disk.stats.misses == 5 and disk.stats.hits == 0


def test_a_file_under_another_key_is_not_used(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path)
    a, b = b"a" * 16, b"b" * 16
    disk.put(a, _tensors(0))
    disk.path(b).parent.mkdir(parents=True, exist_ok=True)
    os.replace(disk.path(a), disk.path(b))  # renamed: its metadata names key a
    assert disk.get(b) is None and disk.stats.corrupt == 1


def test_concurrent_writers_of_one_key_leave_one_valid_file(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path)
    key = b"k" * 16
    threads = [threading.Thread(target=disk.put, args=(key, _tensors(7))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    files = list(disk.path(key).parent.iterdir())
    assert files == [disk.path(key)]  # no temporary file left behind
    found = DiskTier(tmp_path).get(key)
    assert found is not None and torch.equal(found[0]["layer.0"], _tensors(7)["layer.0"])


def test_size_cap_deletes_least_recently_used(tmp_path: Path) -> None:
    probe = DiskTier(tmp_path / "probe")
    size = probe.put(b"p" * 16, _tensors(0))
    disk = DiskTier(tmp_path / "capped", max_bytes=3 * size)
    keys = [bytes([i]) * 16 for i in range(5)]
    for i, key in enumerate(keys):
        disk.put(key, _tensors(0))
        os.utime(disk.path(key), (1000 + i, 1000 + i))  # distinct, increasing use times
        if i == 2:
            assert disk.get(keys[0]) is not None  # key 0 used again: now the most recent
            os.utime(disk.path(keys[0]), (1002.5, 1002.5))
        assert disk.nbytes <= 3 * size
    remaining = {f.key for f in disk.files()}
    assert remaining == {keys[0].hex(), keys[3].hex(), keys[4].hex()}
    assert disk.stats.evicted == 2
    assert disk.clear() == 3 and disk.files() == []


def test_clear_refuses_a_negative_or_nan_age(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path)
    disk.put(bytes(16), _tensors(0))
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="older_than_s must be >= 0"):
            disk.clear(bad)
    assert len(disk.files()) == 1


def test_a_file_given_as_the_folder_is_refused(tmp_path: Path) -> None:
    a_file = tmp_path / "kv"
    a_file.write_text("")
    with pytest.raises(DiskFolderError, match=f"disk cache folder {a_file} is a file, not a folder"):
        DiskTier(a_file)
    with pytest.raises(DiskFolderError, match=f"cannot be made: {a_file} is a file"):
        DiskTier(a_file / "below")
    with pytest.raises(DiskFolderError, match="is a file"):
        EngineConfig(disk_cache=str(a_file))  # before any model loads
    assert a_file.read_text() == ""


def fail_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every block write fails as on a read-only folder (root, who runs the tests, may write anywhere)."""

    def denied(path: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(disk_module, "write_atomic", denied)


def test_a_folder_that_cannot_be_written_is_warned_about_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    disk = DiskTier(tmp_path)
    fail_writes(monkeypatch)
    for i in range(3):
        with pytest.raises(OSError) as failed:
            disk.put(bytes([i]) * 16, _tensors(i))
        disk.write_failed(failed.value)
    assert disk.stats.write_errors == 3 and disk.failing
    warned = [r for r in caplog.records if r.name == "kvmem.tiers"]
    assert len(warned) == 1 and warned[0].levelname == "WARNING"
    assert warned[0].getMessage() == (
        f"disk cache {tmp_path} cannot be written ([Errno 13] Permission denied): its blocks will be "
        "recomputed, not reused"
    )
    monkeypatch.undo()
    disk.put(bytes(16), _tensors(0))
    assert not disk.failing  # writes go through again
