"""The lowest budget offloaded retrieval runs at, in full precision and in block formats.

Usage: .venv/bin/python scripts/offload_floor.py [--model smollm2-135m] [--tokens 1536]

For each policy and each budget (a share of the full cache's bytes for the same prompt), one
generation of 8 tokens: it runs (the share of the full cache it held) or is refused up front with
``KVBudgetError`` (offload needs its resident blocks, a summary per offloaded block and a fetch).
Prompt: Python's own docs (pydoc_data.topics), ``--tokens`` long.
"""

from __future__ import annotations

import argparse
from pydoc_data.topics import topics

import kvmem
from kvmem.errors import KVBudgetError

POLICIES = "offload,offload+kivi4+res8,offload+rotk4v2+res8"
SHARES = "0.29,0.2,0.1,0.07"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=1536)
    parser.add_argument("--policies", default=POLICIES, help=f"comma-separated (default {POLICIES})")
    parser.add_argument("--shares", default=SHARES, help=f"budgets as shares of the full cache ({SHARES})")
    args = parser.parse_args()

    model = kvmem.load_model(args.model, dtype="float32")
    full = kvmem.LLM(model)
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = full.encode(text)[: args.tokens]
    full_bytes = full.generate(ids, max_new_tokens=8).stats.kv_bytes
    print(f"{args.model}, {len(ids)} prompt tokens, full cache {full_bytes / 2**20:.2f} MiB (float32)")
    print("| policy | budget | result |\n|---|---|---|")
    for policy in args.policies.split(","):
        for share in (float(s) for s in args.shares.split(",")):
            llm = kvmem.LLM(model, policy=policy, kv_budget=int(share * full_bytes))
            try:
                held = llm.generate(ids, max_new_tokens=8).stats.kv_bytes
                result = f"runs, holds {held / full_bytes:.3f} of the full cache"
            except KVBudgetError as e:
                result = f"refused: {str(e).split(';')[0]}"
            print(f"| `{policy}` | {share:.0%} | {result} |", flush=True)


if __name__ == "__main__":
    main()
