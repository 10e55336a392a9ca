"""The engine's benchmark: one request's decode speed, and many requests under one KV budget.

Usage:
  .venv/bin/python scripts/engine_bench.py decode [--model smollm2-135m] [--lengths 1024,4096,8192]
      [--dtypes float32,bfloat16] [--methods hf,full,kivi4] [--new-tokens 32] [--out DIR]
  .venv/bin/python scripts/engine_bench.py throughput [--model smollm2-135m] [--requests 32]
      [--prompt-tokens 2048] [--new-tokens 128] [--budget 256MiB] [--methods full,kivi4,snapkv+kivi4,hf]
      [--max-num-seqs 32] [--out DIR]

decode: for each dtype and prompt length, transformers' own forward with its DynamicCache ("hf") and
kvmem with the full cache and with KIVI-4, one request, the prompt prefilled then --new-tokens
greedy steps timed. throughput: --requests distinct prompts of --prompt-tokens tokens, all sent at
once, each generating exactly --new-tokens tokens, under a KV budget of --budget: kvmem's engine
with each policy (an evicting one gets an equal share of the budget per sequence), and
transformers' continuous batching ("hf": generate_batch, its paged cache sized to the budget).
vLLM's CPU server on the same prompts: scripts/vllm_bench.py.

Writes <command>.json and <command>.md into --out (default results/engine/<model>) and prints the table.
Run it alone on the machine: timings taken while something else runs are not comparable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
from pathlib import Path

import torch

from kvmem.bench.serving import decode_speed, describe, hf_throughput, kvmem_throughput, token_slices
from kvmem.errors import format_bytes
from kvmem.kv.budget import parse_budget
from kvmem.model.loader import load_model


def decode(args: argparse.Namespace) -> list[dict[str, object]]:
    rows = []
    lengths = [int(x) for x in args.lengths.split(",")]
    for dtype in args.dtypes.split(","):
        loaded = load_model(args.model, dtype)
        (ids,) = token_slices(loaded, 1, max(lengths))
        for length in lengths:
            for method in args.methods.split(","):
                point = decode_speed(loaded, ids[:length], method, args.new_tokens)
                print(f"{dtype} {length:>5} {method:>6}: {point.tokens_per_s:.1f} tok/s", flush=True)
                rows.append(dataclasses.asdict(point))
    return rows


def throughput(args: argparse.Namespace) -> list[dict[str, object]]:
    loaded = load_model(args.model, args.dtype)
    prompts = token_slices(loaded, args.requests, args.prompt_tokens)
    budget = parse_budget(args.budget)
    assert budget is not None
    rows = []
    for method in args.methods.split(","):
        if method == "hf":
            result = hf_throughput(loaded, prompts, args.new_tokens, budget)
        else:
            policy = None if method == "full" else method
            result = kvmem_throughput(loaded, prompts, args.new_tokens, budget, policy, args.max_num_seqs)
        print(describe(result), flush=True)
        rows.append(dataclasses.asdict(result))
    return rows


def _cell(value: object, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def _size(value: object) -> str:
    return "-" if value is None else format_bytes(int(str(value)))


def table(command: str, rows: list[dict[str, object]]) -> str:
    if command == "decode":
        lines = ["| dtype | prompt tokens | method | decode tok/s | KV bytes |", "|---|---|---|---|---|"]
        for r in rows:
            speed, kv = _cell(r["tokens_per_s"], "{:.1f}"), _size(r["kv_bytes"])
            lines.append(f"| {r['dtype']} | {r['prompt_tokens']} | {r['method']} | {speed} | {kv} |")
        return "\n".join(lines)
    lines = [
        "| method | output tok/s | req/s | max running | peak KV | peak RSS growth | TTFT p50 | preempted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {_cell(r['output_tokens_per_s'], '{:.1f}')} | "
            f"{_cell(r['requests_per_s'], '{:.3f}')} | "
            f"{_cell(r['max_running'])} | {_size(r['peak_kv_bytes'])} | {_size(r['peak_rss_growth'])} | "
            f"{_cell(r['ttft_p50_s'], '{:.1f} s')} | {_cell(r['preemptions'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    sub = parser.add_subparsers(dest="command", required=True)
    dec = sub.add_parser("decode")
    dec.add_argument("--lengths", default="1024,4096,8192")
    dec.add_argument("--dtypes", default="float32,bfloat16")
    dec.add_argument("--methods", default="hf,full,kivi4")
    dec.add_argument("--new-tokens", type=int, default=32)
    tp = sub.add_parser("throughput")
    tp.add_argument("--requests", type=int, default=32)
    tp.add_argument("--prompt-tokens", type=int, default=2048)
    tp.add_argument("--new-tokens", type=int, default=128)
    tp.add_argument("--budget", default="256MiB")
    tp.add_argument("--methods", default="full,kivi4,snapkv+kivi4,hf")
    tp.add_argument("--max-num-seqs", type=int, default=32)
    tp.add_argument("--dtype", default="float32")
    for p in (dec, tp):
        p.add_argument("--model", default="smollm2-135m")
        p.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = decode(args) if args.command == "decode" else throughput(args)
    out = args.out or Path("results/engine") / args.model
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join(["scripts/engine_bench.py", *sys.argv[1:]]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (out / f"{args.command}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = table(args.command, rows)
    (out / f"{args.command}.md").write_text(f"`{meta['command']}`\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
