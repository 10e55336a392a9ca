"""How often each engine path changes greedy tokens, on many prompts, in a given dtype.

Usage: .venv/bin/python scripts/exactness.py [--dtype bfloat16] [--prompts 100] [--out DIR]

Every path is compared with the same prompt run alone (one request, nothing else in the engine):

- batched: all prompts through one ``LLM.generate(list)`` (prefill chunks ride beside other
  requests' decodes, decode attention padded over several sequences);
- preempted: the same batch in a pool too small for all of them, with small reservations, so
  the newest requests are swapped to disk and back;
- with ``--reuse``, reused (exact): the prompt run again after it was cached (the default
  ``exact_reuse``: the reused prefix ends on a prefill-chunk boundary), and reused (whole
  blocks): the same with ``exact_reuse=False``.

Prompts are distinct slices of Python's documentation (offline), 96 to 256 tokens, 16 greedy
tokens each, blocks of 16 tokens, prefill chunks of 64. Prints a table; writes
``exactness-<dtype>.json`` into --out
(default results/exactness/<model>). Whether bfloat16 paths differ depends on the CPU (its
matrix kernels): the table says which kind of CPU it came from.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

import kvmem
from kvmem.bench.serving import token_slices
from kvmem.model.dtype import cpu_has_native_bf16
from kvmem.model.loader import load_model

NEW_TOKENS = 16
CHUNK = 64
BLOCK = 16


def lengths(n: int) -> list[int]:
    return [96 + (37 * i) % 161 for i in range(n)]  # 96 .. 256, spread


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else 0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="also run each prompt again from the prefix cache, with exact_reuse and without it",
    )
    args = parser.parse_args()
    loaded = load_model(args.model, args.dtype)
    pool = token_slices(loaded, args.prompts, 256)
    prompts = [ids[:n] for ids, n in zip(pool, lengths(args.prompts))]

    exact = kvmem.LLM(loaded, block_size=BLOCK, prefill_chunk=CHUNK, prefix_cache=True)
    blocks = kvmem.LLM(loaded, block_size=BLOCK, prefill_chunk=CHUNK, prefix_cache=True, exact_reuse=False)
    alone, warm_exact, warm_blocks, reused = [], [], [], {"exact": 0, "blocks": 0}
    for ids in tqdm(prompts, desc="alone" + (", then reused" if args.reuse else ""), unit="prompt"):
        cold = exact.generate(ids, max_new_tokens=NEW_TOKENS)  # nothing cached yet: run alone
        alone.append(cold.token_ids)
        if args.reuse:
            again = exact.generate(ids, max_new_tokens=NEW_TOKENS)
            warm_exact.append(again.token_ids)
            reused["exact"] += again.stats.tokens_reused
            blocks.generate(ids, max_new_tokens=NEW_TOKENS)
            again = blocks.generate(ids, max_new_tokens=NEW_TOKENS)
            warm_blocks.append(again.token_ids)
            reused["blocks"] += again.stats.tokens_reused
    for llm in (exact, blocks):
        llm.prefix.clear()  # type: ignore[union-attr]

    batch_llm = kvmem.LLM(loaded, block_size=BLOCK, prefill_chunk=CHUNK, max_num_seqs=16)
    batched = [r.token_ids for r in batch_llm.generate(prompts, max_new_tokens=NEW_TOKENS)]
    peak = batch_llm.engine.scheduler.stats.peak_running

    per_block = loaded.spec.full_cache_bytes(1, BLOCK)  # one block's bytes for every layer
    tight = kvmem.LLM(
        loaded,
        block_size=BLOCK,
        prefill_chunk=CHUNK,
        max_num_seqs=16,
        kv_budget=8 * 17 * per_block,  # eight requests of up to 17 blocks (272 tokens)
        reserve_new_tokens=1,
    )
    preempted = [r.token_ids for r in tight.generate(prompts, max_new_tokens=NEW_TOKENS)]
    swaps = tight.engine.scheduler.stats.swapped_out

    rows = {"batched": batched, "preempted": preempted}
    if args.reuse:
        rows["reused (exact)"] = warm_exact
        rows["reused (whole blocks)"] = warm_blocks
    cpu = "native bfloat16 (AVX512-BF16/AMX)" if cpu_has_native_bf16() else "AVX2 only (bfloat16 emulated)"
    report: dict[str, object] = {
        "model": args.model,
        "dtype": args.dtype,
        "cpu": cpu,
        "prompts": len(prompts),
        "new_tokens": NEW_TOKENS,
        "prefill_chunk": CHUNK,
        "block_size": BLOCK,
        "peak_running_batched": peak,
        "swapped_out_preempted": swaps,
        "tokens_reused": reused,
        "paths": {},
    }
    print(f"{args.model}, {args.dtype}, CPU {cpu}; {len(prompts)} prompts, {NEW_TOKENS} greedy tokens each")
    print("| path | prompts whose tokens differ from alone | first difference at step (median) |")
    print("|---|---|---|")
    for name, outs in rows.items():
        steps = sorted(s for s in (first_difference(a, b) for a, b in zip(outs, alone)) if s is not None)
        median = steps[len(steps) // 2] if steps else None
        report["paths"][name] = {"differ": len(steps), "first_steps": steps}  # type: ignore[index]
        print(f"| {name} | {len(steps)} of {len(prompts)} | {'-' if median is None else median} |")
    print(
        f"tokens reused: exact {reused['exact']}, whole blocks {reused['blocks']}; "
        f"batched ran up to {peak} at once; "
        f"{swaps} swaps to disk under the tight budget"
    )
    out = args.out or Path("results/exactness") / args.model
    out.mkdir(parents=True, exist_ok=True)
    (out / f"exactness-{args.dtype}.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / f'exactness-{args.dtype}.json'}")


if __name__ == "__main__":
    main()
