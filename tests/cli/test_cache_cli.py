"""`--disk-cache` across processes, and `kvmem cache ls|stats|clear`."""

from __future__ import annotations

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
