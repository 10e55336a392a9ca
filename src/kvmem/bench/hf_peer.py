"""The peer every user knows: transformers' own ``generate`` with its ``DynamicCache`` (full cache).

Same model object, same prompts, same greedy decoding and answer length as the kvmem runs. Each
request (in ``multiturn``: each turn, with the conversation so far) is a fresh ``generate`` call, as
a user of plain transformers would make it. The gold answer's log-probability comes from one
forward pass over prompt + gold answer.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from transformers import DynamicCache
from transformers.generation.streamers import BaseStreamer

from kvmem.bench.config import HF
from kvmem.bench.example import Context
from kvmem.bench.kvmem_runner import Request, _ids, answer_length
from kvmem.bench.memory import PeakRSS
from kvmem.bench.record import Record
from kvmem.bench.scoring import score
from kvmem.engine.llm import LLM


class _Clock(BaseStreamer):
    """Notes when generate() hands over its first new token (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def put(self, value: Any) -> None:
        self.calls.append(time.perf_counter())

    def end(self) -> None:
        pass


def cache_bytes(cache: DynamicCache) -> int:
    """Bytes of the keys and values a DynamicCache holds."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


@torch.inference_mode()
def run_questions_hf(llm: LLM, context: Context, request: Request) -> list[Record]:
    """Every question of ``context`` through ``model.generate`` (``request.mode`` as for kvmem)."""
    model = llm.loaded.model
    records = []
    conversation = llm.encode(context.text)
    for i, question in enumerate(context.questions):
        if request.mode == "multiturn":
            conversation += _ids(llm, question.question)
            ids = list(conversation)
        else:
            ids = llm.encode(context.text + question.question)
        n = answer_length(llm, question)
        clock = _Clock()
        with PeakRSS() as rss:
            start = time.perf_counter()
            out = model.generate(  # type: ignore[operator]
                torch.tensor([ids]),
                max_new_tokens=n,
                do_sample=False,
                streamer=clock,
                return_dict_in_generate=True,
                pad_token_id=llm.tokenizer.pad_token_id or 0,
            )
            end = time.perf_counter()
        tokens = [int(t) for t in out.sequences[0, len(ids) :]]
        first = clock.calls[1] if len(clock.calls) > 1 else end
        gold = _ids(llm, question.answer)
        logits = model(torch.tensor([ids + gold[:-1]])).logits[0, len(ids) - 1 :].float()  # [N, V]
        logp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(gold)[:, None])
        kv = cache_bytes(out.past_key_values)
        output = str(llm.tokenizer.decode(tokens, skip_special_tokens=True))
        records.append(
            Record(
                method=HF,
                budget=None,
                task=context.task,
                mode=request.mode,
                context=int(str(context.meta.get("seed", 0))),
                question=i,
                prompt_tokens=len(ids),
                score=score(context.examples[i], output),
                gold_logprob=float(logp.mean()),
                ppl=None,
                kl=None,
                kv_bytes=kv,
                kv_ratio=kv / request.full_bytes,
                prefill_s=first - start,
                ttft_s=first - start,
                decode_tokens_per_s=(len(tokens) - 1) / (end - first) if len(tokens) > 1 else math.nan,
                peak_rss=rss.growth,
                output=output,
            )
        )
        if request.mode == "multiturn":
            conversation += tokens
    return records
