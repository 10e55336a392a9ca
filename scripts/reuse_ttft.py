"""TTFT for one long document asked several questions: recompute vs RAM reuse vs disk reuse.

Usage: .venv/bin/python scripts/reuse_ttft.py [--model smollm2-135m] [--tokens 3072] [--out DIR]

- recompute: every question prefills the whole document again (no prefix cache).
- ram: one LLM with the prefix cache; the first question computes the document, the others reuse it.
- disk: the first question ran earlier with --disk-cache; each question then comes from a NEW LLM
  (an empty pool, as after a restart) that reads the document's blocks back from the disk tier.
  The files are in the OS page cache by then, as they would be on a machine that just wrote them.
Every mode must give the same answers (greedy); the script checks and says so.
Prints a table; writes ``reuse_ttft.json`` into --out (default results/reuse/<model>).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from pydoc_data.topics import topics

import kvmem
from kvmem.model.loader import LoadedModel, load_model

QUESTIONS = [
    "\n\nQuestion: Which statement is described first in the text above?\nAnswer:",
    "\n\nQuestion: What does the text say about the 'with' statement?\nAnswer:",
    "\n\nQuestion: Name one operator the text mentions.\nAnswer:",
    "\n\nQuestion: What is a keyword argument, according to the text?\nAnswer:",
    "\n\nQuestion: Summarise the last paragraph in one sentence.\nAnswer:",
]
NEW_TOKENS = 8


def document(loaded: LoadedModel, tokens: int) -> str:
    text = "\n".join(topics[k] for k in sorted(topics))
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    return str(loaded.tokenizer.decode(ids))


def run(llm_for_question: list[kvmem.LLM], doc: str) -> tuple[list[float], list[list[int]], list[int]]:
    ttfts, answers, reused = [], [], []
    for llm, question in zip(llm_for_question, QUESTIONS):
        result = llm.generate(doc + question, max_new_tokens=NEW_TOKENS)
        ttfts.append(result.stats.ttft_s)
        answers.append(result.token_ids)
        reused.append(result.stats.tokens_reused)
    return ttfts, answers, reused


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=3072, help="document length in tokens")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    loaded = load_model(args.model)
    doc = document(loaded, args.tokens)
    n = len(QUESTIONS)
    modes: dict[str, tuple[list[float], list[list[int]], list[int]]] = {}
    kvmem.LLM(loaded).generate("warm up", max_new_tokens=2)  # first-call overheads out of the numbers
    modes["recompute"] = run([kvmem.LLM(loaded) for _ in range(n)], doc)
    shared = kvmem.LLM(loaded, prefix_cache=True)
    modes["ram"] = run([shared] * n, doc)
    with tempfile.TemporaryDirectory(prefix="kvmem-reuse-") as folder:
        kvmem.LLM(loaded, disk_cache=folder).generate(doc + QUESTIONS[0], max_new_tokens=NEW_TOKENS)
        modes["disk"] = run([kvmem.LLM(loaded, disk_cache=folder) for _ in range(n)], doc)
    base = modes["recompute"][1]
    same = all(answers == base for _, answers, _ in modes.values())
    recompute = statistics.mean(modes["recompute"][0])
    rows = []
    print(f"{args.model}: a {len(loaded.tokenizer(doc)['input_ids'])}-token document, {n} questions")
    print(f"{'mode':<10} {'TTFT per question (s)':<42} {'mean (s)':>9} {'vs recompute':>13}")
    for mode, (ttfts, _, reused) in modes.items():
        # RAM reuse: the first question computes the document; the others are what reuse buys
        timed = ttfts[1:] if mode == "ram" else ttfts
        mean = statistics.mean(timed)
        rows.append(
            {
                "mode": mode,
                "ttft_s": ttfts,
                "mean_ttft_s": mean,
                "tokens_reused": reused,
                "speedup": recompute / mean,
            }
        )
        shown = " ".join(f"{t:.3f}" for t in ttfts)
        print(f"{mode:<10} {shown:<42} {mean:>9.3f} {recompute / mean:>12.1f}x")
    print(f"answers identical in every mode: {same}")
    out = args.out or Path("results") / "reuse" / args.model
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "model": args.model,
        "document_tokens": args.tokens,
        "questions": QUESTIONS,
        "new_tokens": NEW_TOKENS,
        "identical_answers": same,
        "modes": rows,
    }
    (out / "reuse_ttft.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
