"""``kvmem demo``: kvmem's main job shown end to end — a multi-turn chat over a long document,
with the KV bytes held, the compression against a full cache, and the speed of every turn."""

from __future__ import annotations

from importlib.resources import files

from kvmem.engine.llm import LLM
from kvmem.errors import format_bytes

COMPRESSED_BUDGET = "8MiB"
COMPRESSED_POLICY = "snapkv+kivi4"
QUESTIONS = (
    "Who designed the lighthouse on Gull Point?",
    "In what year did the whole bay freeze?",
    "How many boats were lost in the storm of 1903?",
    "Who started the Lantern Festival?",
)


def document() -> str:
    """The shipped demo text (original, CC0; ``src/kvmem/data/harbor_town.txt``, about 1k tokens):
    ``kvmem.demo_document()``, a long prompt for trying budgets and policies."""
    return files("kvmem").joinpath("data/harbor_town.txt").read_text(encoding="utf-8")


def run_demo(llm: LLM, max_new_tokens: int = 48) -> None:
    doc = document()
    spec = llm.spec
    print(
        f"kvmem demo — model {llm.config.model}: {spec.num_layers} layers, {spec.num_kv_heads} KV heads, "
        f"head dim {spec.head_dim}, {format_bytes(spec.kv_bytes_per_token)} of KV per token"
    )
    budget = llm.pool.budget
    print(
        f"KV budget: {format_bytes(budget) if budget else 'unlimited'}; "
        f"block size {llm.pool.block_size} tokens"
    )
    print(f"document: {len(llm.encode(doc))} tokens ('The History of Larkspur Harbor')\n")
    held = converse(llm, doc, max_new_tokens)
    print(
        f"conversation closed: {format_bytes(held)} of KV freed; "
        f"pool now holds {format_bytes(llm.pool.bytes_used)}\n"
    )
    compressed = LLM(llm.loaded, kv_budget=COMPRESSED_BUDGET, policy=COMPRESSED_POLICY)
    print(f"The same conversation under a {COMPRESSED_BUDGET} budget with policy {COMPRESSED_POLICY}:\n")
    converse(compressed, doc, max_new_tokens)


def converse(llm: LLM, doc: str, max_new_tokens: int) -> int:
    """Ask the questions in one chat; print answers and KV stats; return the bytes held at the end."""
    with llm.chat() as session:
        for turn, question in enumerate(QUESTIONS, start=1):
            message = (
                f"Read this document and answer.\n\n{doc}\n\nQuestion: {question}" if turn == 1 else question
            )
            result = session.send(message, max_new_tokens=max_new_tokens)
            s = result.stats
            print(f"[turn {turn}] Q: {question}")
            print(f"          A: {result.text.strip()}")
            print(
                f"          KV held {format_bytes(s.kv_bytes)} for {s.kv_tokens} of {s.tokens_seen} tokens "
                f"({s.kv_ratio:.0%} of a full cache's {format_bytes(s.kv_bytes_full)}, in whole blocks) | "
                f"prefilled {s.tokens_prefilled} new tokens in {s.prefill_s:.2f}s (TTFT {s.ttft_s:.2f}s) | "
                f"{s.new_tokens} tokens at {s.decode_tokens_per_s:.1f} tok/s\n"
            )
        return session.kv_bytes
