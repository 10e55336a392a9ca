"""Running one kvmem method (a policy under a budget, or the full cache) over a task's context.

Modes (after SCBench):
- ``single``: every question is its own request: the context and the question are prefilled together.
- ``multiturn``: the context is prefilled (and compressed, query-agnostically) once; the questions
  follow one after another in the same sequence, each after the previous answer.
- ``multirequest``: independent requests that share the context as a prefix. With no policy or a
  quantizer alone, kvmem's prefix cache lets every request after the first adopt the context's
  blocks (its prefill and TTFT show it); eviction policies cannot share and compute like ``single``.

For each question: greedy answer (scored by the task), and the gold answer's log-probability,
teacher-forced on a fork of the cache taken right after the prompt, so it does not disturb the answer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from kvmem.bench.example import Context, Question
from kvmem.bench.memory import PeakRSS
from kvmem.bench.record import Record
from kvmem.bench.scoring import score
from kvmem.engine.llm import LLM
from kvmem.engine.sequence import Sequence


@dataclass(frozen=True)
class Request:
    """Which method and budget a run is, for its records."""

    method: str
    budget: float | None
    mode: str
    full_bytes: int  # the full cache's bytes for this context (kv_ratio's denominator)


def answer_length(llm: LLM, question: Question) -> int:
    """Tokens to generate: the gold answer's, plus a few to see that it ends there."""
    return len(_ids(llm, question.answer)) + 4


def end_of_sequence(llm: LLM) -> set[int]:
    """The token ids that end a generation (the model's generation config)."""
    eos = llm.loaded.model.generation_config.eos_token_id
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


def _ids(llm: LLM, text: str) -> list[int]:
    return list(llm.tokenizer(text, add_special_tokens=False)["input_ids"])


def teacher_forced(seq: Sequence, logits: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """Log-probabilities [N, V] predicting each of ``targets``, feeding them one by one."""
    steps = [logits]
    for token in targets[:-1]:
        steps.append(seq.step(token))
    return torch.log_softmax(torch.stack(steps), dim=-1)


def run_questions(llm: LLM, context: Context, request: Request) -> list[Record]:
    """Every question of ``context``, in ``request.mode``."""
    records = []
    seq = llm.new_sequence() if request.mode == "multiturn" else None
    if seq is not None:
        seq.token_ids = llm.encode(context.text)
    try:
        for i, question in enumerate(context.questions):
            if seq is None:
                single = llm.new_sequence()
                single.token_ids = llm.encode(context.text + question.question)
                if request.mode == "multirequest":
                    # the context's blocks, if an earlier request left them
                    single.reuse_prefix(llm.config.reuse_align)
                try:
                    records.append(_answer(llm, single, context, i, request))
                finally:
                    single.release()
            else:
                seq.token_ids += _ids(llm, question.question)
                records.append(_answer(llm, seq, context, i, request))
    finally:
        if seq is not None:
            seq.release()
    return records


def _answer(llm: LLM, seq: Sequence, context: Context, index: int, request: Request) -> Record:
    question = context.questions[index]
    prompt_tokens = len(seq.token_ids)
    reused = 0 if seq.prefix_state is None or request.mode != "multirequest" else seq.num_cached
    with PeakRSS() as prefill_rss:
        start = time.perf_counter()
        logits = seq.prefill(llm.config.prefill_chunk)
        prefill_s = time.perf_counter() - start
    held = seq.cache.nbytes
    branch = seq.fork()  # the gold answer's log-probability, without touching the sequence
    try:
        gold = _ids(llm, question.answer)
        logp = teacher_forced(branch, logits, gold)
        gold_logprob = float(logp.gather(1, torch.tensor(gold)[:, None]).mean())
    finally:
        branch.release()
    n, eos = answer_length(llm, question), end_of_sequence(llm)
    tokens = [int(logits.argmax())]  # the first token comes from the prefill: TTFT = prefill time
    with PeakRSS() as decode_rss:
        decode_start = time.perf_counter()
        while len(tokens) < n and tokens[-1] not in eos:  # as generate() stops
            logits = seq.step(tokens[-1])
            held = max(held, seq.cache.nbytes)
            tokens.append(int(logits.argmax()))
        decode_s = time.perf_counter() - decode_start
    seq.token_ids.append(tokens[-1])  # pending: a following turn prefills it with its question
    output = str(llm.tokenizer.decode(tokens, skip_special_tokens=True))
    example = context.examples[index]
    return Record(
        method=request.method,
        budget=request.budget,
        task=context.task,
        mode=request.mode,
        context=int(str(context.meta.get("seed", 0))),
        question=index,
        prompt_tokens=prompt_tokens,
        score=score(example, output),
        gold_logprob=gold_logprob,
        ppl=None,
        kl=None,
        kv_bytes=held,
        kv_ratio=held / request.full_bytes,
        prefill_s=prefill_s,
        ttft_s=prefill_s,
        decode_tokens_per_s=(len(tokens) - 1) / decode_s if len(tokens) > 1 else math.nan,
        peak_rss=max(prefill_rss.growth, decode_rss.growth),
        output=output,
        tokens_reused=reused,
    )


def run_text(
    llm: LLM, context: Context, request: Request, reference: torch.Tensor | None
) -> tuple[Record, torch.Tensor]:
    """Real text: prefill the context, teacher-force the continuation; perplexity and KL against
    ``reference`` (the full cache's log-probabilities [N, V]; None when this is the full cache)."""
    question = context.questions[0]
    seq = llm.new_sequence()
    seq.token_ids = llm.encode(context.text)
    prompt_tokens = len(seq.token_ids)  # teacher forcing appends the continuation
    try:
        with PeakRSS() as rss:
            start = time.perf_counter()
            logits = seq.prefill(llm.config.prefill_chunk)
            prefill_s = time.perf_counter() - start
            held = seq.cache.nbytes
            gold = _ids(llm, question.answer)
            decode_start = time.perf_counter()
            logp = teacher_forced(seq, logits, gold)  # [N, V]
            decode_s = time.perf_counter() - decode_start
            held = max(held, seq.cache.nbytes)
    finally:
        seq.release()
    timing = TextTiming(prompt_tokens, prefill_s, decode_s, rss.growth)
    return text_record(context, request, gold, logp, reference, held, timing), logp


@dataclass(frozen=True)
class TextTiming:
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    peak_rss: int


def text_record(
    context: Context,
    request: Request,
    gold: list[int],
    logp: torch.Tensor,
    reference: torch.Tensor | None,
    held: int,
    timing: TextTiming,
) -> Record:
    """The real-text record: perplexity of ``gold`` under ``logp`` [N, V], KL against ``reference``."""
    target = logp.gather(1, torch.tensor(gold)[:, None])
    kl = 0.0 if reference is None else float((reference.exp() * (reference - logp)).sum(-1).mean())
    return Record(
        method=request.method,
        budget=request.budget,
        task=context.task,
        mode=request.mode,
        context=int(str(context.meta.get("seed", 0))),
        question=0,
        prompt_tokens=timing.prompt_tokens,
        score=None,
        gold_logprob=float(target.mean()),
        ppl=float(torch.exp(-target.mean())),
        kl=kl,
        kv_bytes=held,
        kv_ratio=held / request.full_bytes,
        prefill_s=timing.prefill_s,
        ttft_s=timing.prefill_s,
        decode_tokens_per_s=(len(gold) - 1) / timing.decode_s if timing.decode_s > 0 else math.nan,
        peak_rss=timing.peak_rss,
        output="",
    )
