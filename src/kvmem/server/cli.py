"""``kvmem serve``: its arguments and the command. ``kvmem.cli`` registers it."""

from __future__ import annotations

import argparse
import signal
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvmem.engine import options
from kvmem.errors import KVMemError, format_bytes
from kvmem.kv.budget import parse_budget

if TYPE_CHECKING:
    from kvmem.engine.llm import LLM


# serve's engine options whose default is not EngineConfig's: a server admits more requests at once
# than it could finish without preempting
SERVE_DEFAULTS = {"reserve_new_tokens": 128}


class ServeUsageError(KVMemError, ValueError):
    """A ``kvmem serve`` option out of range."""


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: Callable[[argparse.ArgumentParser], None],
) -> None:
    """``common`` adds the model, budget, policy and reuse options every command shares."""
    serve = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (completions, chat, streaming, /metrics) on one KV pool",
        description="Serve POST /v1/completions and /v1/chat/completions (streamed with server-sent "
        "events or not), GET /v1/models, /health and /metrics (Prometheus) from one engine: every "
        "request shares one KV pool under --kv-budget, batched continuously. SIGTERM or Ctrl-C "
        "drains: no new requests, running ones finish (up to --drain-timeout; past it each ends "
        "with a 503 error, a stream with an error event and [DONE]), the disk tier is flushed, exit 0.",
    )
    common(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1 (repeatable: one key per tenant)",
    )
    serve.add_argument(
        "--isolate-tenants",
        action="store_true",
        help="derive each request's cache salt from its API key, so tenants never share cached blocks",
    )
    serve.add_argument("--served-model-name", help="the model name clients send (default: --model)")
    options.add_options(serve, ("max_num_seqs", "max_batch_tokens", "reserve_new_tokens"), SERVE_DEFAULTS)
    serve.add_argument(
        "--max-waiting",
        type=int,
        default=64,
        help="requests queued beyond --max-num-seqs; more get 429 with Retry-After (default 64)",
    )
    serve.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds a shutdown waits for running requests (default 30); then they end with an error",
    )
    serve.add_argument(
        "--max-body-size", default="4MiB", help="largest request body accepted (default 4MiB; 413 above)"
    )


def validate(args: argparse.Namespace) -> None:
    """``serve``'s own options, before anything binds or loads (``kvmem.cli`` calls it)."""
    for name in ("max_num_seqs", "max_batch_tokens"):
        if getattr(args, name) < 1:
            raise ServeUsageError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_waiting < 0 or args.reserve_new_tokens < -1 or args.drain_timeout < 0:
        raise ServeUsageError("--max-waiting and --drain-timeout must be >= 0, --reserve-new-tokens >= -1")
    if not 0 < args.port < 65536:
        raise ServeUsageError(f"--port must be in 1..65535, got {args.port}")
    parse_budget(args.max_body_size, "--max-body-size")  # raises InvalidBudgetError


def engine_changes(args: argparse.Namespace) -> dict[str, object]:
    """What ``serve`` changes in the ``EngineConfig`` its options describe: a forward computes at
    least one token for each running sequence."""
    return {"max_batch_tokens": max(args.max_batch_tokens, args.max_num_seqs)}


def cmd_serve(args: argparse.Namespace, make_llm: Callable[[argparse.Namespace], LLM]) -> int:
    from kvmem.server.listen import bind

    sockets = bind(args.host, args.port)  # a port in use fails here, before the model loads
    try:
        return _serve(args, make_llm, sockets)
    finally:
        for sock in sockets:
            sock.close()


def _serve(
    args: argparse.Namespace, make_llm: Callable[[argparse.Namespace], LLM], sockets: list[socket.socket]
) -> int:
    import uvicorn

    from kvmem.server.app import ServeConfig, create_app
    from kvmem.server.listen import Server
    from kvmem.server.loop import EngineLoop
    from kvmem.server.metrics import ServerMetrics
    from kvmem.server.progress import loading

    with loading(args.model):
        llm = make_llm(args)
    config = ServeConfig(
        model_name=args.served_model_name or args.model,
        api_keys=tuple(args.api_key),
        isolate_tenants=args.isolate_tenants,
        max_waiting=args.max_waiting,
        max_body_bytes=int(parse_budget(args.max_body_size, "--max-body-size") or 0),
        drain_timeout_s=args.drain_timeout,
    )
    loop = EngineLoop(llm.engine, ServerMetrics(), config.max_waiting)
    app = create_app(llm.loaded, loop, config)
    budget = "unlimited" if llm.pool.budget is None else format_bytes(llm.pool.budget)
    banner = (
        f"kvmem serve: {config.model_name} ({str(llm.spec.dtype).removeprefix('torch.')}) listening on "
        f"http://{args.host}:{args.port} | KV budget {budget} | policy {args.policy or 'none'} | "
        f"prefix cache {'on' if llm.prefix is not None else 'off'}"
    )
    # uvicorn drains on SIGTERM / SIGINT, restores the handlers it found and raises the signal
    # again; with these no-op handlers in place a drained server then exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    # The engine loop cuts what still runs at --drain-timeout; uvicorn's own limit is a backstop
    # for an engine that never answers (it cancels the handlers).
    server_config = uvicorn.Config(
        app, log_level="warning", timeout_graceful_shutdown=int(args.drain_timeout) + 10
    )
    server = Server(server_config, banner, on_shutdown=lambda: loop.begin_drain(args.drain_timeout))
    server.run(sockets=sockets)
    return 0 if server.started else 1
