"""One measured answer (or one real-text continuation, or one speed point) of a bench run."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Record:
    """One question answered by one method under one budget.

    ``score``: the task's exact-match score (None for real text); ``gold_logprob``: mean
    log-probability per token of the gold answer, teacher-forced on a copy of the cache right after
    the prompt; ``ppl`` / ``kl``: real text only (KL of the next-token distributions from the full
    cache's, mean over the continuation). ``kv_bytes``: the most KV bytes the method held during the
    request; ``kv_ratio``: that over the full cache's bytes for the same context. Times in seconds;
    ``peak_rss`` is the largest growth of the process's resident memory during prefill and decode.
    """

    method: str
    budget: float | None  # share of the full cache's bytes; None: no budget
    task: str
    mode: str
    context: int  # seed of the context
    question: int
    prompt_tokens: int
    score: float | None
    gold_logprob: float
    ppl: float | None
    kl: float | None
    kv_bytes: int
    kv_ratio: float
    prefill_s: float
    ttft_s: float
    decode_tokens_per_s: float
    peak_rss: int
    output: str
    tokens_reused: int = 0  # prompt tokens whose KV came from an earlier request (prefix reuse)
    error: str | None = None  # why the method could not run (e.g. a budget below its minimum)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def refused(
        cls, method: str, budget: float | None, task: str, mode: str, context: int, question: int, why: str
    ) -> Record:
        """A method that could not run here (``why``): no measurement, only the reason."""
        nan = math.nan
        return cls(
            method, budget, task, mode, context, question, prompt_tokens=0, score=None, gold_logprob=nan,
            ppl=None, kl=None, kv_bytes=0, kv_ratio=0.0, prefill_s=nan, ttft_s=nan,
            decode_tokens_per_s=nan, peak_rss=0, output="", error=why,
        )  # fmt: skip


@dataclass(frozen=True)
class SpeedPoint:
    """Decode speed of one method at one context length."""

    method: str
    budget: float | None
    context_tokens: int
    decode_tokens_per_s: float
    kv_bytes: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)
