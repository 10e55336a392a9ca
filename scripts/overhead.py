"""kvmem vs transformers' own generate on the same ~2k-token prompt, in one run.

Usage: .venv/bin/python scripts/overhead.py [--model smollm2-135m] [--new-tokens 64] [--repeats 3]
Prints one row per engine (best of the repeats): TTFT, decode tokens/s, KV bytes held.
"""

from __future__ import annotations

import argparse
import os
import time
from pydoc_data.topics import topics

import torch
from transformers import DynamicCache
from transformers.generation.streamers import BaseStreamer

import kvmem
from kvmem.errors import format_bytes


def prompt_ids(llm: kvmem.LLM, n: int) -> list[int]:
    text = "\n".join(topics[k] for k in sorted(topics))
    return llm.encode(text)[:n]


class Clock(BaseStreamer):
    """Records when transformers' generate hands out each new token (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_run(model: torch.nn.Module, ids: list[int], new_tokens: int) -> tuple[float, float, int]:
    clock, cache = Clock(), DynamicCache(config=model.config)
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(
            torch.tensor([ids]),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            past_key_values=cache,
            streamer=clock,
        )
    generated = clock.times[1:]
    ttft = generated[0] - start
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    return ttft, (len(generated) - 1) / (generated[-1] - generated[0]), held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block-size", type=int, default=64, help="kvmem's tokens per block")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    llm = kvmem.LLM(args.model, block_size=args.block_size)
    model = llm.loaded.model
    model.generation_config.eos_token_id = None  # both engines generate exactly --new-tokens
    ids = prompt_ids(llm, args.prompt_tokens)
    rows: dict[str, list[tuple[float, float, int]]] = {"transformers": [], "kvmem": []}
    for _ in range(args.repeats):
        rows["transformers"].append(hf_run(model, ids, args.new_tokens))
        s = llm.generate(ids, max_new_tokens=args.new_tokens).stats
        rows["kvmem"].append((s.ttft_s, s.decode_tokens_per_s, s.kv_bytes))
    print(
        f"model {args.model}, block size {llm.pool.block_size}, prompt {len(ids)} tokens, "
        f"{args.new_tokens} new tokens, best of {args.repeats}, torch threads {torch.get_num_threads()}"
    )
    print(f"{'engine':<14}{'TTFT s':>9}{'decode tok/s':>14}{'KV held':>14}")
    best = {}
    for engine, results in rows.items():
        ttft = min(r[0] for r in results)
        speed = max(r[1] for r in results)
        best[engine] = speed
        print(f"{engine:<14}{ttft:>9.2f}{speed:>14.1f}{format_bytes(results[-1][2]):>14}")
    print(f"kvmem decode speed relative to transformers: {best['kvmem'] / best['transformers']:.1%}")


if __name__ == "__main__":
    main()
