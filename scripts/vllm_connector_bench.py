"""kvmem's vLLM connector: time to first token when a prompt's KV comes from Redis, per stored format.

Usage: make vllm-venv   (once: vLLM's CPU build in .venv-vllm, kvmem installed in it)
       .venv/bin/python scripts/vllm_connector_bench.py [--model smollm2-135m] [--prompt-tokens 2048]
           [--new-tokens 32] [--formats raw,kivi8,kivi4] [--dtype float32] [--out DIR]

Starts a real redis-server on 127.0.0.1, then for each format two vLLM CPU servers one after the
other (the machine has room for one): the first computes prompt P (its KV stored in Redis through
the connector), the second computes another prompt Q of the same length (TTFT computed, the server
warm) and then P (TTFT with P's blocks loaded from Redis). Also plain vLLM (no connector) on Q, for
what storing costs. Reports Redis bytes per block, TTFTs, and whether P's greedy tokens on the
second server equal the first's. Writes connector.json / connector.md into --out (default
results/vllm-connector/<model>).
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import AbstractContextManager
from pathlib import Path

from kvmem.bench.load import RequestTiming, one_request
from kvmem.bench.redis_server import redis_server
from kvmem.bench.servers import running, vllm_serve
from kvmem.bench.serving import token_slices
from kvmem.integrations.vllm.settings import VLLM_OPTIONS, transfer_config
from kvmem.model.loader import load_model, resolve_model_folder

ROOT = Path(__file__).resolve().parent.parent
PORT = 8766


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--formats", default="raw,kivi8,kivi4")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    python = ROOT / ".venv-vllm" / "bin" / "python"
    if not (ROOT / ".venv-vllm" / ".kvmem-installed").exists():
        sys.exit("vLLM's venv with kvmem is missing: run `make vllm-venv` first")
    loaded = load_model(args.model)
    p, q = token_slices(loaded, 2, args.prompt_tokens)
    folder = resolve_model_folder(args.model)
    log = ROOT / "results-local-vllm-connector.log"

    def serve(redis_url: str | None, fmt: str) -> AbstractContextManager[int]:
        options = []
        if redis_url is not None:
            options = [*VLLM_OPTIONS, "--kv-transfer-config", transfer_config(redis_url, format=fmt)]
        spec = loaded.spec
        command = vllm_serve(python, folder, args.model, spec, PORT, 2**30, args.dtype, 4, extra=options)
        return running(command, PORT, log)

    def ask(prompt: list[int]) -> RequestTiming:
        return one_request("127.0.0.1", PORT, args.model, prompt, args.new_tokens, 600)

    rows = []
    with serve(None, "raw"):
        plain = ask(q)
    print(f"plain vLLM: TTFT {plain.ttft_s:.2f} s")
    with redis_server(ROOT / "build" / "redis") as redis:
        for fmt in args.formats.split(","):
            redis.flush()
            with serve(redis.url, fmt):
                first = ask(p)
            keys = redis.client.keys("kvmem:vllm:*")
            stored = sum(int(redis.client.strlen(k)) for k in keys)
            with serve(redis.url, fmt):
                computed, loaded_p = ask(q), ask(p)
            row = {
                "format": fmt,
                "blocks": len(keys),
                "bytes_per_block": stored // max(1, len(keys)),
                "ttft_first_s": first.ttft_s,
                "ttft_computed_s": computed.ttft_s,
                "ttft_loaded_s": loaded_p.ttft_s,
                "cached_tokens": loaded_p.cached_tokens,
                "same_tokens": loaded_p.text == first.text,
            }
            rows.append(row)
            print(json.dumps(row))
    out = args.out or ROOT / "results" / "vllm-connector" / args.model
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join(["scripts/vllm_connector_bench.py", *sys.argv[1:]]),
        "dtype": args.dtype,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "plain_vllm_ttft_s": plain.ttft_s,
    }
    (out / "connector.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        f"`{meta['command']}` — {args.prompt_tokens}-token prompts, {args.dtype}; plain vLLM (no connector) "
        f"TTFT {plain.ttft_s:.2f} s on Q\n",
        "| format | Redis bytes per block | TTFT computed (Q) | TTFT loaded (P) | speed-up "
        "| tokens from Redis | same greedy tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['format']} | {r['bytes_per_block'] / 2**20:.2f} MiB | {r['ttft_computed_s']:.2f} s | "
            f"{r['ttft_loaded_s']:.2f} s | {r['ttft_computed_s'] / r['ttft_loaded_s']:.1f}x | "
            f"{r['cached_tokens']} | {'yes' if r['same_tokens'] else 'no'} |"
        )
    (out / "connector.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
