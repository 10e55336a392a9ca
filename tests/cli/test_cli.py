"""The CLI contract: JSON keys, exit code 2 with one line on stderr for bad input."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmem.cli import MODEL_OPTIONS, REUSE_OPTIONS, build_parser, main
from kvmem.model.loader import LoadedModel
from tiny_models import save_folder

JSON_KEYS = {
    "text",
    "token_ids",
    "kv_bytes",
    "kv_tokens",
    "tokens_seen",
    "kv_bytes_full",
    "kv_ratio",
    "prefill_s",
    "ttft_s",
    "decode_tokens_per_s",
}


def kvmem(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``kvmem ARGS`` run by ``kvmem.cli.main`` in this process, its stdin, stdout and stderr
    swapped for strings: what the command does and prints, without a new interpreter's ~10 s of
    importing torch and transformers per call. ``kvmem_process`` runs the real command."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        saved, sys.stdin = sys.stdin, io.StringIO(stdin or "")
        stack.callback(setattr, sys, "stdin", saved)
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's own errors and --help
            code = exc.code if isinstance(exc.code, int) else 2
    return subprocess.CompletedProcess(["kvmem", *args], code, out.getvalue(), err.getvalue())


def kvmem_process(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``kvmem ARGS`` as its own process (the installed entry point's module)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "kvmem.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory, llama: LoadedModel) -> str:
    return str(save_folder(llama, tmp_path_factory.mktemp("cli") / "tiny-llama"))


def assert_usage_error(proc: subprocess.CompletedProcess[str], message: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "--prompt", "hi", "--kv-budget", "-5"], "invalid KV budget"),
        (["generate", "--prompt", "hi", "--kv-budget", "lots"], "invalid KV budget"),
        (["generate", "--prompt-file", "/no/such/file.txt"], "prompt file not found"),
        (["generate", "--prompt", "hi", "--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["info", "--model", "/no/such/model.gguf"], "unknown model"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["generate", "--prompt", "hi", "--device", "banana"], "unknown device 'banana'"),
    ],
)
def test_bad_input_exits_2_with_one_line(args: list[str], message: str) -> None:
    assert_usage_error(kvmem(*args), message)


def test_prompt_too_long(tiny_folder: str, tmp_path: Path) -> None:
    prompt = tmp_path / "long.txt"
    prompt.write_text("word " * 400)  # > 256 tokens of context
    assert_usage_error(
        kvmem("generate", "--model", tiny_folder, "--prompt-file", str(prompt)), "tokens of context"
    )


def test_budget_too_small(tiny_folder: str) -> None:
    proc = kvmem("generate", "--model", tiny_folder, "--prompt", "hello", "--kv-budget", "1KiB")
    assert_usage_error(proc, "KV budget exceeded")


def test_generate_json(tiny_folder: str) -> None:
    proc = kvmem("generate", "--model", tiny_folder, "--prompt", "hello", "--max-new-tokens", "7", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert JSON_KEYS <= set(result)
    assert len(result["token_ids"]) == 7
    assert result["kv_tokens"] == result["tokens_seen"] == 5 + 6  # prompt bytes + computed new tokens
    assert 0 < result["kv_bytes"] == result["kv_bytes_full"] and result["kv_ratio"] == 1.0  # whole blocks


def test_generate_streams_text_and_stats(tiny_folder: str) -> None:
    proc = kvmem("generate", "--model", tiny_folder, "--prompt", "hello", "--max-new-tokens", "5")
    assert proc.returncode == 0, proc.stderr
    assert "[kv:" in proc.stderr and "tok/s" in proc.stderr


def test_chat_reads_turns_and_reports_kv(tiny_folder: str) -> None:
    proc = kvmem("chat", "--model", tiny_folder, "--max-new-tokens", "4", stdin="hi\nagain\n/quit\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("[kv:") == 2


def info_rows(*args: str) -> dict[str, str]:
    proc = kvmem("info", *args)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("  ", 1) for line in proc.stdout.splitlines())


def test_info_counts_bytes_in_the_dtype_that_runs(tiny_folder: str) -> None:
    from kvmem.model.dtype import resolve_dtype

    rows = {d: info_rows("--model", tiny_folder, "--dtype", d) for d in ("float32", "bfloat16", "auto")}
    per_token = {d: int(r["KV bytes per token (full cache)"].split()[0]) for d, r in rows.items()}
    assert per_token["float32"] == 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads, head dim 16
    assert per_token["bfloat16"] == per_token["float32"] // 2
    auto = str(resolve_dtype("auto")).replace("torch.", "")  # bfloat16 on AMX / AVX512-BF16 CPUs
    assert per_token["auto"] == per_token[auto]
    assert rows["auto"]["KV dtype"].strip().startswith(f"auto → {auto} on this CPU")
    assert rows["bfloat16"]["KV dtype"].strip() == "bfloat16 (as asked)"
    block = rows["float32"]["KV bytes per 64-token block (all layers)"]
    assert int(block.split()[0]) == 64 * per_token["float32"]


def test_help_explains() -> None:
    proc = kvmem("generate", "--help")
    assert proc.returncode == 0
    assert "--kv-budget" in proc.stdout and "--json" in proc.stdout


@pytest.mark.real
def test_generate_json_on_the_default_model() -> None:
    proc = kvmem_process(
        "generate", "--prompt", "The capital of France is", "--max-new-tokens", "8", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert JSON_KEYS <= set(result)
    assert result["text"].strip().startswith("Paris")


def test_chat_goes_on_after_a_refused_turn(tiny_folder: str) -> None:
    turns = "hi\n" + "x" * 150 + "\nok\n"
    proc = kvmem("chat", "--model", tiny_folder, "--max-new-tokens", "4", "--kv-budget", "48KiB", stdin=turns)
    assert proc.returncode == 0, proc.stderr
    assert "KV budget exceeded" in proc.stderr
    assert proc.stderr.count("[kv:") == 2


def test_policies_lists_every_registered_policy() -> None:
    from kvmem.compress.registry import QUANTIZERS, RESIDUALS, SCORERS

    proc = kvmem("policies")
    assert proc.returncode == 0, proc.stderr
    names = [line.split()[0] for line in proc.stdout.strip().splitlines()]
    assert names == [
        *SCORERS,
        "pyramid",
        "cake",
        "adakv",
        "mixed",
        "merge",
        *QUANTIZERS,
        "sliding-<format>",
        *RESIDUALS,
        "offload",
    ]


def test_generate_with_a_policy_stays_within_the_budget(tiny_folder: str) -> None:
    args = ["generate", "--model", tiny_folder, "--prompt", "hello " * 30, "--max-new-tokens", "60"]
    proc = kvmem(*args, "--policy", "snapkv", "--kv-budget", "16KiB", "--block-size", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["kv_bytes"] <= 16 * 1024 and result["kv_ratio"] < 0.5
    assert len(result["token_ids"]) == 60


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kv-budget", "25%"], "needs a compression policy"),
        (["--policy", "nope"], "unknown policy 'nope'"),
        (["--policy", "h2o", "--kv-budget", "150%"], "percentage must be in"),
    ],
)
def test_bad_policy_input_exits_2(args: list[str], message: str) -> None:
    assert_usage_error(kvmem("generate", "--prompt", "hi", *args), message)


def test_bench_help_and_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    from kvmem.cli import main

    with pytest.raises(SystemExit) as done:
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "--suite" in out and "--budgets" in out
    for args, why in [
        (["--methods", "full,nope"], "unknown policy"),
        (["--budgets", "0.5,abc"], "--budgets"),
        (["--budgets", "1.5"], "budgets are shares"),
        (["--tasks", "passkey,nope"], "unknown task"),
        (["--block-size", "0"], "--block-size must be at least 1"),
    ]:
        assert main(["bench", *args, "--out", "/nonexistent/never-written"]) == 2
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "70000"], "--port must be in 1..65535"),
        (["--max-body-size", "lots"], "lots"),
        (["--kv-budget=-1MiB"], "budget"),
    ],
)
def test_serve_refuses_bad_options_before_loading(args: list[str], message: str) -> None:
    assert_usage_error(kvmem("serve", *args), message)


def test_serve_help_explains_the_server() -> None:
    proc = kvmem("serve", "--help")
    assert proc.returncode == 0
    for option in ("--api-key", "--isolate-tenants", "--max-waiting", "--drain-timeout", "--disk-cache"):
        assert option in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--disk-cache-max", "abc"], "invalid disk cache size (disk_cache_max / --disk-cache-max) 'abc'"),
        (["--kv-budget", "99999999999999999999GiB"], "larger than any machine could hold"),
        (["--compress-after-prompt", "lots", "--policy", "snapkv"], "invalid prompt peak"),
    ],
)
def test_a_bad_size_names_its_option(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvmem.cli import main

    assert main(["generate", "--prompt", "hi", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_a_gpu_this_machine_lacks_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from kvmem.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["generate", "--prompt", "hi", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "device 'cuda' is not available" in err


def test_a_prompt_file_that_is_a_directory_or_not_text(
    tiny_folder: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvmem.cli import main

    assert main(["generate", "--prompt-file", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"prompt file {tmp_path} is a directory" in err
    binary = tmp_path / "prompt.bin"
    binary.write_bytes(b"ok \xff\xfe")
    assert (
        main(["generate", "--prompt-file", str(binary), "--model", tiny_folder]) == 2
    )  # read before loading
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"prompt file {binary} is not UTF-8 text (byte 0xff at offset 3)" in err


SERVE_OPTIONS = (*MODEL_OPTIONS, *REUSE_OPTIONS, "max_num_seqs", "max_batch_tokens", "reserve_new_tokens")


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["generate", "--prompt", "hi"], (*MODEL_OPTIONS, *REUSE_OPTIONS)),
        (["chat"], (*MODEL_OPTIONS, *REUSE_OPTIONS)),
        (["demo"], MODEL_OPTIONS),
        (["serve"], SERVE_OPTIONS),
        (["info"], ("model", "dtype", "block_size")),
        (["bench"], ("model", "block_size")),
    ],
)
def test_engine_options_are_engine_configs_fields_with_their_defaults_and_help(
    argv: list[str],
    names: tuple[str, ...],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from kvmem.engine import options
    from kvmem.engine.config import EngineConfig
    from kvmem.server.cli import SERVE_DEFAULTS

    command_defaults = SERVE_DEFAULTS if argv[0] == "serve" else {}
    defaults = EngineConfig().replace(**command_defaults)
    args = build_parser().parse_args(argv)
    assert options.values(args) == {name: getattr(defaults, name) for name in names}
    monkeypatch.setenv("COLUMNS", "100000")  # one line per option
    with pytest.raises(SystemExit):
        build_parser().parse_args([argv[0], "--help"])
    help_text = capsys.readouterr().out
    for name in names:
        assert options.flag_help(name, getattr(defaults, name)) in help_text, name
