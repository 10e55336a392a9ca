"""Quality against physical KV bytes for each eviction policy, on real text (teacher-forced).

Usage: .venv/bin/python scripts/policy_quality.py [--model smollm2-135m] [--context 1000] [--continuation 100]

The context is prefilled under the policy with a byte budget of 50%, 25% and 10% of what the full
cache needs at the end; the continuation is then fed token by token (teacher forcing). Reported:
perplexity of the continuation, mean KL divergence of the next-token distributions from the full
cache's, the KV bytes really held at the end and their bits per element of the context (every
byte held, metadata and full-precision residual blocks included, over the full cache's elements).
Text: Python's own docs (pydoc_data.topics).
"""

from __future__ import annotations

import argparse
from pydoc_data.topics import topics

import torch

import kvmem
from kvmem.compress.registry import QUANTIZERS, SCORERS, find_quantizer
from kvmem.errors import KVBudgetError, format_bytes


def run(llm: kvmem.LLM, ids: list[int], n_ctx: int) -> tuple[torch.Tensor, int]:
    """Log-probs [N, V] for each continuation token's prediction, and the bytes held at the end."""
    seq = llm.new_sequence()
    seq.token_ids = ids[:n_ctx]
    logits = [seq.prefill(llm.config.prefill_chunk)]
    for token in ids[n_ctx:-1]:
        logits.append(seq.step(token))
    held = seq.cache.nbytes
    seq.release()
    return torch.log_softmax(torch.stack(logits), dim=-1), held


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=1000)
    parser.add_argument("--continuation", type=int, default=100)
    parser.add_argument(
        "--policies",
        default=",".join([*SCORERS, *QUANTIZERS, "snapkv+kivi4", "h2o+kivi4", "tova+kivi4", "snapkv+kivi2"]),
    )
    parser.add_argument("--shares", default="0.5,0.25,0.1")
    args = parser.parse_args()
    loaded = kvmem.load_model(args.model)
    full_llm = kvmem.LLM(loaded)
    text = "\n".join(topics[k] for k in sorted(topics))
    ids = full_llm.encode(text)[: args.context + args.continuation]
    targets = torch.tensor(ids[args.context :])
    reference, full_bytes = run(full_llm, ids, args.context)

    def ppl(logp: torch.Tensor) -> float:
        return float(torch.exp(-logp.gather(1, targets[:, None]).mean()))

    print(f"model {args.model}: context {args.context} tokens, continuation {args.continuation}")
    # bits per element of the context: every byte held (codes, scales, residual blocks) over the
    # elements the full cache stores for the same tokens
    dtype_bits = loaded.spec.element_size * 8
    print(f"{'policy':<16}{'budget':>8}{'KV held':>12}{'ratio':>8}{'bits/el':>8}{'ppl':>9}{'KL':>9}")
    head = f"{'full cache':<16}{'-':>8}{format_bytes(full_bytes):>12}{1.0:>8.2f}{dtype_bits:>8.2f}"
    print(f"{head}{ppl(reference):>9.2f}{0.0:>9.3f}")
    for name in args.policies.split(","):
        # quantization alone evicts nothing: it runs once, with no budget, and reports what it holds
        shares = [None] if find_quantizer(name) is not None else [float(s) for s in args.shares.split(",")]
        for share in shares:
            budget = None if share is None else int(full_bytes * share)
            llm = kvmem.LLM(loaded, kv_budget=budget, policy=name)
            try:
                logp, held = run(llm, ids, args.context)
            except KVBudgetError as exc:  # e.g. sliding-window layers alone need more than the budget
                print(f"{name:<16}{share:>8.0%}  refused: {exc}", flush=True)
                continue
            kl = float((reference.exp() * (reference - logp)).sum(-1).mean())
            label = "-" if share is None else f"{share:.0%}"
            ratio = held / full_bytes
            row = f"{name:<16}{label:>8}{format_bytes(held):>12}{ratio:>8.2f}{ratio * dtype_bits:>8.2f}"
            print(f"{row}{ppl(logp):>9.2f}{kl:>9.3f}", flush=True)


if __name__ == "__main__":
    main()
