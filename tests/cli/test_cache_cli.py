"""`--disk-cache` across processes, and `kvmem cache ls|stats|clear`."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmem.cli import main
from kvmem.model.loader import LoadedModel
from tiny_models import save_folder

PROMPT = "The harbor town kept its lamps lit through the long winter nights, and the ferry ran at six. When?"


def _generate(folder: Path, cache: Path, *extra: str) -> dict[str, object]:
    cmd = [sys.executable, "-m", "kvmem.cli", "generate", "--model", str(folder), "--prompt", PROMPT]
    cmd += [
        "--max-new-tokens",
        "6",
        "--block-size",
        "4",
        "--prefill-chunk",
        "8",
        "--disk-cache",
        str(cache),
        "--json",
        *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_a_second_process_reads_the_prefix_from_disk(llama: LoadedModel, tmp_path: Path) -> None:
    folder = save_folder(llama, tmp_path / "tiny-llama")
    cache = tmp_path / "kv"
    first = _generate(folder, cache)
    assert first["tokens_reused"] == 0
    tier = first["disk_tier"]
    assert isinstance(tier, dict) and tier["writes"] > 0 and tier["hits"] == 0
    second = _generate(folder, cache)
    prompt_tokens = second["prompt_tokens"]
    assert isinstance(prompt_tokens, int)
    reused = (prompt_tokens - 1) // 8 * 8  # whole prefill chunks (exact reuse), not whole blocks
    assert second["tokens_reused"] == second["tokens_from_disk"] == reused
    assert second["tokens_prefilled"] == prompt_tokens - reused
    assert second["token_ids"] == first["token_ids"]


def test_cache_ls_stats_clear(
    llama: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvmem.engine.llm import LLM

    cache = tmp_path / "kv"
    LLM(llama, block_size=4, prefill_chunk=4, disk_cache=cache).generate(PROMPT, max_new_tokens=2)
    files = sorted(p.name.removesuffix(".kvblock") for p in cache.glob("??/*.kvblock"))
    assert main(["cache", "ls", "--dir", str(cache)]) == 0
    listed = sorted(line.split()[0] for line in capsys.readouterr().out.splitlines())
    assert listed == files and files
    assert main(["cache", "stats", "--dir", str(cache)]) == 0
    assert f"{len(files)} block files" in capsys.readouterr().out
    assert main(["cache", "clear", "--dir", str(cache), "--older-than", "1"]) == 0  # all are new
    assert f"deleted 0 of {len(files)}" in capsys.readouterr().out
    assert main(["cache", "clear", "--dir", str(cache)]) == 0
    assert f"deleted {len(files)} of {len(files)}" in capsys.readouterr().out
    assert not list(cache.glob("??/*.kvblock"))
    assert main(["cache", "ls", "--dir", str(tmp_path / "missing")]) == 2
    assert "no such cache folder" in capsys.readouterr().err


def test_an_eviction_policy_with_a_disk_cache_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["generate", "--prompt", "x", "--policy", "snapkv", "--kv-budget", "25%", "--disk-cache", "d"]
    )
    assert code == 2
    assert "quantizer alone" in capsys.readouterr().err


@pytest.mark.parametrize("days", ["-3", "nan", "inf", "abc", ""])
def test_clear_refuses_a_bad_older_than_and_deletes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], days: str
) -> None:
    cache = tmp_path / "kv"
    block = cache / "ab" / ("ab" * 16 + ".kvblock")
    block.parent.mkdir(parents=True)
    block.write_bytes(b"x")
    assert main(["cache", "clear", "--dir", str(cache), f"--older-than={days}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--older-than must be a number of days >= 0" in err
    assert block.is_file()


def test_cache_options_that_do_not_apply_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["cache", "ls", "--dir", str(tmp_path), "--older-than", "1"]) == 2
    assert "--older-than applies to `kvmem cache clear` only" in capsys.readouterr().err
    a_file = tmp_path / "f"
    a_file.write_text("")
    assert main(["cache", "clear", "--dir", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file, not a cache folder" in err
    assert a_file.is_file()


def test_ls_into_a_reader_that_leaves_stops_quietly(tmp_path: Path) -> None:
    for i in range(3000):  # ~250 KB of lines: more than a pipe buffers
        name = f"{i:032x}"
        (tmp_path / name[:2]).mkdir(exist_ok=True)
        (tmp_path / name[:2] / f"{name}.kvblock").write_bytes(b"")
    cmd = [sys.executable, "-m", "kvmem.cli", "cache", "ls", "--dir", str(tmp_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().endswith("ago\n")  # `| head -n 1`
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(timeout=300) == 141  # as if killed by SIGPIPE, like ls | head
    assert err == ""


def test_a_disk_cache_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "kv"
    a_file.write_text("keep me")
    assert main(["generate", "--prompt", "x", "--disk-cache", str(a_file)]) == 2  # before loading
    err = capsys.readouterr().err
    assert err == f"kvmem: error: disk cache folder {a_file} is a file, not a folder; give a folder " + (
        "(disk_cache= / --disk-cache)\n"
    )
    assert a_file.read_text() == "keep me"


def test_a_disk_cache_that_cannot_be_written_is_warned_about_once(
    llama: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvmem.tiers import disk

    def denied(path: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    folder = save_folder(llama, tmp_path / "tiny-llama")
    capsys.readouterr()  # transformers' own output while saving
    monkeypatch.setattr(disk, "write_atomic", denied)  # as a read-only folder (the tests run as root)
    args = [
        "generate",
        "--model",
        str(folder),
        "--prompt",
        PROMPT,
        "--block-size",
        "4",
        "--max-new-tokens",
        "2",
    ]
    assert main([*args, "--disk-cache", str(tmp_path / "kv"), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["disk_tier"]["write_errors"] > 1
    assert err.splitlines() == [
        f"kvmem: warning: disk cache {tmp_path / 'kv'} cannot be written ([Errno 13] Permission denied): "
        "its blocks will be recomputed, not reused"
    ]
