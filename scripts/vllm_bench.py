"""vLLM's CPU server on the throughput workload of scripts/engine_bench.py, for the side-by-side table.

Usage: make bench-vllm   (once: vLLM's CPU build in .venv-vllm)
       .venv/bin/python scripts/vllm_bench.py [--model smollm2-135m] [--requests 32] [--prompt-tokens 2048]
           [--new-tokens 128] [--budget 256MiB] [--dtype float32] [--concurrency 32] [--out DIR]

Starts `python -m vllm.entrypoints.openai.api_server` from .venv-vllm on 127.0.0.1 with kvmem's
converted safetensors folder of the model, its KV cache limited to --budget (as a number of
128-token blocks, --num-gpu-blocks-override: VLLM_CPU_KVCACHE_SPACE takes whole GiB only),
eager mode, then sends the same prompts (token ids) as engine_bench.py through kvmem.bench.load:
all --concurrency at once, streamed, greedy, ignore_eos. Writes vllm.json / vllm.md into --out
(default results/engine/<model>). The server is stopped at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from kvmem.bench.load import run_load
from kvmem.bench.servers import running, vllm_serve
from kvmem.bench.serving import token_slices
from kvmem.kv.budget import parse_budget
from kvmem.model.loader import load_model, resolve_model_folder

ROOT = Path(__file__).resolve().parent.parent
PORT = 8765


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--budget", default="256MiB")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    python = ROOT / ".venv-vllm" / "bin" / "python"
    if not python.exists():
        sys.exit("vLLM's venv is missing: run `make bench-vllm` first")
    loaded = load_model(args.model)
    prompts = token_slices(loaded, args.requests, args.prompt_tokens)
    folder = resolve_model_folder(args.model)
    budget = parse_budget(args.budget)
    assert budget is not None
    command = vllm_serve(python, folder, args.model, loaded.spec, PORT, budget, args.dtype, args.concurrency)
    with running(command, PORT, ROOT / "results-local-vllm.log"):
        started = time.perf_counter()
        result = run_load("127.0.0.1", PORT, args.model, prompts, args.new_tokens, args.concurrency)
        print(f"vLLM: {result.output_tokens_per_s:.1f} output tok/s in {time.perf_counter() - started:.0f} s")
    out = args.out or ROOT / "results" / "engine" / args.model
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join(["scripts/vllm_bench.py", *sys.argv[1:]]),
        "kv_bytes": command.kv_bytes,
        "dtype": args.dtype,
    }
    (out / "vllm.json").write_text(json.dumps({"meta": meta, "result": dataclasses.asdict(result)}, indent=1))
    (out / "vllm.md").write_text(
        f"`{meta['command']}`\n\n| output tok/s | req/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |\n"
        "|---|---|---|---|---|---|\n"
        f"| {result.output_tokens_per_s:.1f} | {result.requests_per_s:.3f} | {result.ttft_p50_s:.1f} s | "
        f"{result.ttft_p99_s:.1f} s | {result.itl_p50_s * 1000:.0f} ms | {result.itl_p99_s * 1000:.0f} ms |\n"
    )
    print(json.dumps(dataclasses.asdict(result), indent=1))


if __name__ == "__main__":
    main()
