"""The ``kvmem`` command line: thin over the library. Bad input exits with code 2 and one line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kvmem import console
from kvmem.bench import cli as bench_cli
from kvmem.engine import options
from kvmem.engine.config import EngineConfig
from kvmem.errors import KVBudgetError, KVMemError, PromptTooLongError, format_bytes
from kvmem.model.device import resolve_device
from kvmem.model.registry import EMBEDDED
from kvmem.server import cli as serve_cli
from kvmem.tiers import cli as cache_cli

if TYPE_CHECKING:
    from kvmem.engine.chat import ChatSession
    from kvmem.engine.llm import LLM

# EngineConfig's fields that generate, chat, demo and serve take as options (kvmem.engine.options)
MODEL_OPTIONS = (
    "model",
    "kv_budget",
    "policy",
    "block_size",
    "prefill_chunk",
    "compress_after_prompt",
    "dtype",
    "threads",
)
REUSE_OPTIONS = ("prefix_cache", "disk_cache", "disk_cache_max", "exact_reuse", "redis_cache", "redis_ttl_s")

EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 128 + 13  # as a process killed by SIGPIPE: `kvmem cache ls | head`


class UsageError(KVMemError):
    """Bad command-line input found before any model is loaded."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmem",
        description="Run a Hugging Face decoder with its KV cache in a paged pool under a hard byte budget.",
        epilog="Embedded models: "
        + "; ".join(f"{m.name} ({m.description})" for m in EMBEDDED.values())
        + ". Budgets: 64MiB, 512MB, 1GiB, a number of bytes, or 'unlimited'; "
        "with --policy also 25% or 512tok.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="complete a prompt and report KV bytes, TTFT and speed")
    _model_args(gen)
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompt-file", type=Path, help="read the prompt from this file ('-' for stdin)")
    _sampling_args(gen)
    _reuse_args(gen)
    gen.add_argument("--stop", action="append", default=[], help="stop when this text appears (repeatable)")
    gen.add_argument("--json", action="store_true", help="print one JSON object with the text and the stats")

    chat = sub.add_parser("chat", help="interactive multi-turn chat; shows KV bytes held after each turn")
    _model_args(chat)
    _sampling_args(chat, default_new_tokens=256)
    _reuse_args(chat)
    chat.add_argument("--system", help="system prompt (a resumed session keeps its own)")
    chat.add_argument(
        "--session",
        metavar="NAME",
        help="keep the conversation in a session file: resume it if the file exists (its KV state is "
        "loaded, nothing is recomputed) and save it after every turn and on exit. A bare NAME is "
        "<cache>/sessions/NAME.kvsession ($KVMEM_CACHE_DIR or ~/.cache/kvmem); a path is used as "
        "given. The session must be resumed with the same --model, --policy and --block-size",
    )

    info = sub.add_parser(
        "info",
        help="architecture, KV heads, bytes of KV per token, context length",
        description="What a model is and how many bytes of KV it holds per token and per block, "
        "counted in the dtype it would run in on --device, as generate/chat/serve would run it.",
    )
    options.add_options(info, ("model", "dtype"))
    info.add_argument("--device", default="cpu", help="where the model would run (auto depends on it)")
    options.add_options(info, ("block_size",))

    sub.add_parser("policies", help="list the compression policies, one line each")

    demo = sub.add_parser("demo", help="kvmem's main job: a multi-turn chat over a long document")
    _model_args(demo)
    demo.add_argument("--max-new-tokens", type=int, default=48, help="tokens per answer (default 48)")

    bench_cli.add_parser(sub)
    cache_cli.add_parser(sub)
    serve_cli.add_parser(sub, _serve_args)
    return parser


def _serve_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    _reuse_args(p)


def _reuse_args(p: argparse.ArgumentParser) -> None:
    options.add_options(p, REUSE_OPTIONS)


def _model_args(p: argparse.ArgumentParser) -> None:
    options.add_options(p, MODEL_OPTIONS)
    p.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda, cuda:1, …")


def _sampling_args(p: argparse.ArgumentParser, default_new_tokens: int = 128) -> None:
    p.add_argument(
        "--max-new-tokens", type=int, default=default_new_tokens, help="at most this many new tokens"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.log_to_stderr()
    try:
        _validate(args)
        _quiet_transformers()
        code = int(COMMANDS[args.command](args))
        sys.stdout.flush()  # a reader that left shows up here, not at the interpreter's exit
        return code
    except BrokenPipeError:  # the reader of stdout left (`| head`): stop quietly
        console.detach_stdout()
        return EXIT_BROKEN_PIPE
    except (KVMemError, ValueError, OSError) as exc:
        print(f"kvmem: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _validate(args: argparse.Namespace) -> None:
    """Check what can be checked before a model is loaded."""
    if args.command == "serve":
        serve_cli.validate(args)
    if hasattr(args, "device"):
        resolve_device(args.device)  # raises UnsupportedDeviceError
    for name in ("max_new_tokens", "block_size", "prefill_chunk"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if getattr(args, "temperature", 0.0) < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if options.values(args):
        engine_config(args)  # validates budget, policy, and whether the policy can share prefixes
    prompt_file = getattr(args, "prompt_file", None)
    if prompt_file is not None and str(prompt_file) != "-":
        if prompt_file.is_dir():
            raise UsageError(f"prompt file {prompt_file} is a directory, not a file")
        if not prompt_file.is_file():
            raise UsageError(f"prompt file not found: {prompt_file}")
    model = getattr(args, "model", None)
    if model is not None and model not in EMBEDDED and not Path(model).expanduser().exists():
        raise UsageError(
            f"unknown model {model!r}: not an embedded model "
            f"({', '.join(sorted(EMBEDDED))}), folder or .gguf file"
        )


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The ``EngineConfig`` the command's options describe, by field name (validated)."""
    changes = options.values(args)
    if args.command == "serve":
        changes |= serve_cli.engine_changes(args)
    return EngineConfig(**changes)


def _make_llm(args: argparse.Namespace) -> LLM:
    """The LLM the options describe."""
    from kvmem.engine.llm import LLM

    return LLM(config=engine_config(args), device=args.device)


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt_file is None else _read_prompt(args.prompt_file)
    llm = _make_llm(args)
    sampling = (args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed, args.stop)
    if args.json:
        result = llm.generate(prompt, *sampling)
        out = result.to_json()
        if llm.prefix is not None and llm.prefix.disk is not None:
            out["disk_tier"] = dataclasses.asdict(llm.prefix.disk.stats)  # this run's tier traffic
        if llm.prefix is not None and llm.prefix.redis is not None:
            out["redis_tier"] = dataclasses.asdict(llm.prefix.redis.stats)
        print(json.dumps(out))
        return 0
    from kvmem.engine.result import GenerationResult

    # a bar through a long prefill (more than two chunks), on a terminal's stderr only
    for event in llm.stream(prompt, *sampling, on_prefill=console.PrefillBar(2 * args.prefill_chunk)):
        if isinstance(event, GenerationResult):
            print(file=sys.stdout, flush=True)
            print(describe(event), file=sys.stderr)
        else:
            print(event, end="", flush=True)
    return 0


def _read_prompt(path: Path) -> str:
    """The prompt file's text (``-``: stdin), UTF-8; raises ``UsageError`` naming it if it is not."""
    stdin = str(path) == "-"
    try:
        return sys.stdin.read() if stdin else path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        where = "stdin" if stdin else f"prompt file {path}"
        raise UsageError(
            f"{where} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
        ) from None


def describe(result: object) -> str:
    """One line of stats for people."""
    from kvmem.engine.result import GenerationResult

    assert isinstance(result, GenerationResult)
    s = result.stats
    return (
        f"[kv: {format_bytes(s.kv_bytes)} held for {s.kv_tokens} of {s.tokens_seen} tokens "
        f"({s.kv_ratio:.0%} of a full cache, in whole blocks) | "
        f"prefill {s.tokens_prefilled} tok in {s.prefill_s:.2f}s"
        + (
            f" ({s.tokens_reused} reused, {s.tokens_from_redis} from redis, {s.tokens_from_disk} from disk)"
            if s.tokens_reused
            else ""
        )
        + f" | TTFT {s.ttft_s:.2f}s | "
        f"{s.new_tokens} new tok at {s.decode_tokens_per_s:.1f} tok/s | {result.finish_reason}]"
    )


def cmd_chat(args: argparse.Namespace) -> int:
    from kvmem.engine.result import GenerationResult
    from kvmem.tiers.session import session_path

    llm = _make_llm(args)
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed}
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"kvmem chat with {args.model} — /quit to leave, /reset to start over", file=sys.stderr)
    path = None if args.session is None else session_path(args.session)
    session = _open_session(llm, args.system, path, args.session)
    bar = console.PrefillBar(2 * args.prefill_chunk)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        message = line.strip()
        if not message:
            continue
        if message == "/quit":
            break
        if message == "/reset":
            session.close()
            session = llm.chat(args.system)
            print("[conversation reset; KV blocks freed]", file=sys.stderr)
            continue
        print("assistant> " if interactive else "", end="", flush=True)
        try:
            for event in session.stream(message, args.max_new_tokens, bar, **sampling):
                if isinstance(event, GenerationResult):
                    print(flush=True)
                    print(describe(event) + f" pool: {format_bytes(llm.pool.bytes_used)}", file=sys.stderr)
                else:
                    print(event, end="", flush=True)
        except (KVBudgetError, PromptTooLongError) as exc:  # the turn is refused; the chat goes on
            print(f"\nkvmem: error: {exc}", file=sys.stderr)
            continue
        if path is not None:  # after every completed turn: an interrupted chat loses at most one
            session.save(path)
    if path is not None:
        session.save(path)
    session.close()
    return 0


def _open_session(llm: LLM, system: str | None, path: Path | None, name: str | None) -> ChatSession:
    """A new chat, or the one saved at ``path`` (its KV state loaded, nothing recomputed)."""
    from kvmem.engine.chat import load_chat

    if path is None or not path.exists():
        return llm.chat(system)
    session = load_chat(llm, path)
    print(
        f"[resumed session {name}: {session.turns} turns, {len(session.sequence.token_ids)} tokens, "
        f"{format_bytes(session.kv_bytes)} of KV loaded; nothing recomputed]",
        file=sys.stderr,
    )
    return session


def cmd_info(args: argparse.Namespace) -> int:
    from kvmem.model.dtype import explain_dtype, resolve_dtype
    from kvmem.model.loader import load_model

    loaded = load_model(args.model)  # float32 weights: only the shape is read; bytes in the dtype asked
    spec = dataclasses.replace(loaded.spec, dtype=resolve_dtype(args.dtype, args.device))
    block = spec.full_cache_bytes(args.block_size, args.block_size)
    full_layers = spec.num_layers - spec.num_sliding_layers
    windows = sorted({w for w in spec.windows if w is not None})
    rows = [
        ("model", args.model),
        ("architecture", f"{spec.model_type} ({type(loaded.model).__name__})"),
        (
            "layers",
            f"{spec.num_layers} ({full_layers} full attention, {spec.num_sliding_layers} sliding window)",
        ),
        ("sliding window", ", ".join(map(str, windows)) if windows else "none"),
        ("attention heads", f"{spec.num_heads} query, {spec.num_kv_heads} KV"),
        ("head dim", str(spec.head_dim)),
        ("KV dtype", explain_dtype(args.dtype, args.device)),
        (
            "KV bytes per token (full cache)",
            f"{spec.kv_bytes_per_token} ({format_bytes(spec.kv_bytes_per_token)})",
        ),
        (f"KV bytes per {args.block_size}-token block (all layers)", f"{block} ({format_bytes(block)})"),
        (
            "KV bytes per token past the windows",
            str(spec.kv_bytes_per_token * full_layers // spec.num_layers),
        ),
        ("max context", f"{spec.max_context} tokens"),
        ("chat template", "yes" if loaded.has_chat_template else "no (plain User:/Assistant: format)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_policies(args: argparse.Namespace) -> int:
    from kvmem.compress.registry import describe_policies

    rows = describe_policies()
    width = max(len(name) for name, _ in rows)
    for name, summary in rows:
        print(f"{name:<{width}}  {summary}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from kvmem.demo import run_demo

    run_demo(_make_llm(args), args.max_new_tokens)
    return 0


COMMANDS = {
    "generate": cmd_generate,
    "chat": cmd_chat,
    "info": cmd_info,
    "policies": cmd_policies,
    "demo": cmd_demo,
    "bench": bench_cli.cmd_bench,
    "cache": cache_cli.cmd_cache,
    "serve": lambda args: serve_cli.cmd_serve(args, _make_llm),
}

if __name__ == "__main__":
    raise SystemExit(main())
