"""The peers every user knows: transformers' own ``generate`` with its ``DynamicCache`` (``hf``, full
cache) or its ``QuantizedCache`` on the optimum-quanto backend (``hf-quanto4``, ``hf-quanto2``).

Same model object, same prompts, same greedy decoding and answer length as the kvmem runs. Each
request (in ``multiturn``: each turn, with the conversation so far) is a fresh ``generate`` call, as
a user of plain transformers would make it. The gold answer's log-probability is teacher-forced
through the same kind of cache: one forward over prompt + gold answer for ``hf``; for a quantized
cache the prompt, then the answer token by token, so every answer token reads quantized keys as it
would in decoding. Real text is teacher-forced the same way, for perplexity and KL.

The quantized cache is transformers' own: groups of 64 (its default) along ``axis 0``, the last
128 tokens kept in full precision (its ``residual_length``). Its bytes are those of the packed codes,
scales and zero points (quanto's tensors, unpacked to their storage) plus the residual.
optimum-quanto is not a kvmem dependency but its ``peers`` extra (``make install`` installs it);
without it these methods are refused with a ``PeerUnavailableError``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from transformers import Cache, DynamicCache, QuantizedCache
from transformers.generation.streamers import BaseStreamer

from kvmem.bench.config import HF_QUANTO
from kvmem.bench.example import Context
from kvmem.bench.kvmem_runner import Request, TextTiming, _ids, answer_length, text_record
from kvmem.bench.memory import PeakRSS
from kvmem.bench.record import Record
from kvmem.bench.scoring import score
from kvmem.engine.llm import LLM
from kvmem.errors import KVMemError
from kvmem.model.cache_arg import cache_kwargs, output_cache


class PeerUnavailableError(KVMemError):
    """A peer cannot run here: its backend is not installed (``pip install 'kvmem[peers]'``), or it
    does not support the model (transformers' QuantizedCache and sliding-window layers)."""


def peer_cache(llm: LLM, method: str) -> Cache | None:
    """The cache a peer hands to transformers: None (generate's own DynamicCache) for ``hf``."""
    bits = HF_QUANTO.get(method)
    if bits is None:
        return None
    try:
        import optimum.quanto  # noqa: F401
    except ImportError as e:
        raise PeerUnavailableError(
            f"{method} needs optimum-quanto (transformers' quantized KV backend): "
            "pip install 'kvmem[peers]' (`make install` does)"
        ) from e
    # quanto groups each token's heads x channels; transformers' default group of 64 must divide them
    # (it does for SmolLM2, 3 x 64, and Gemma 3, 1 x 256; a tiny test model needs a smaller group)
    spec = llm.loaded.spec
    group = math.gcd(64, spec.num_kv_heads * spec.head_dim)
    try:
        return QuantizedCache("quanto", llm.loaded.model.config, nbits=bits, q_group_size=group)
    except ValueError as e:  # e.g. Gemma 3: "only supported for models with only full attention layers"
        raise PeerUnavailableError(f"{method}: transformers' QuantizedCache refuses this model: {e}") from e


class _Clock(BaseStreamer):
    """Notes when generate() hands over its first new token (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def put(self, value: Any) -> None:
        self.calls.append(time.perf_counter())

    def end(self) -> None:
        pass


def tensor_bytes(tensor: object) -> int:
    """Bytes a tensor really stores; a tensor subclass (quanto's packed codes) by its inner tensors."""
    if not isinstance(tensor, torch.Tensor):
        return 0
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None:
        names, _ = flatten()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


_HELD = ("keys", "values", "_quantized_keys", "_quantized_values")  # what a cache layer holds


def cache_bytes(cache: Cache) -> int:
    """Bytes of the keys and values a transformers cache holds (quantized ones as stored)."""
    return sum(tensor_bytes(getattr(layer, name, None)) for layer in cache.layers for name in _HELD)


def _forward(llm: LLM, ids: list[int], cache: Cache | None) -> torch.Tensor:
    """Logits [len(ids), V] of ``ids`` after what ``cache`` holds (no cache: a fresh forward)."""
    out = llm.loaded.model(
        torch.tensor([ids]), **cache_kwargs(llm.loaded.model, cache), use_cache=cache is not None
    )
    return out.logits[0].float()


def _answer_steps(llm: LLM, first: torch.Tensor, gold: list[int], cache: Cache) -> torch.Tensor:
    """Log-probabilities [N, V] of the gold answer, fed token by token after the prompt's logits."""
    steps = [first] + [_forward(llm, [token], cache)[-1] for token in gold[:-1]]
    return torch.log_softmax(torch.stack(steps), dim=-1)


def _teacher_forced(llm: LLM, prompt: list[int], gold: list[int], cache: Cache | None) -> torch.Tensor:
    """Log-probabilities [N, V] predicting each of ``gold`` after ``prompt``."""
    if cache is None:  # the full cache: one forward over prompt + answer gives the same numbers
        return torch.log_softmax(_forward(llm, prompt + gold[:-1], None)[len(prompt) - 1 :], dim=-1)
    return _answer_steps(llm, _forward(llm, prompt, cache)[-1], gold, cache)


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
                **cache_kwargs(model, peer_cache(llm, request.method)),
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
        logp = _teacher_forced(llm, ids, gold, peer_cache(llm, request.method))  # [N, V]
        logp = logp.gather(1, torch.tensor(gold)[:, None])
        kv = cache_bytes(output_cache(out))
        output = str(llm.tokenizer.decode(tokens, skip_special_tokens=True))
        records.append(
            Record(
                method=request.method,
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


@torch.inference_mode()
def run_text_hf(llm: LLM, context: Context, request: Request, reference: torch.Tensor | None) -> list[Record]:
    """Real text through the peer's cache: perplexity of the continuation and KL against ``reference``."""
    prompt, gold = llm.encode(context.text), _ids(llm, context.questions[0].answer)
    cache = peer_cache(llm, request.method) or DynamicCache(config=llm.loaded.model.config)
    with PeakRSS() as rss:
        start = time.perf_counter()
        first = _forward(llm, prompt, cache)[-1]  # [V]
        prefill_s = time.perf_counter() - start
        logp = _answer_steps(llm, first, gold, cache)  # [N, V]
        decode_s = time.perf_counter() - start - prefill_s
    held = cache_bytes(cache)
    timing = TextTiming(len(prompt), prefill_s, decode_s, rss.growth)
    return [text_record(context, request, gold, logp, reference, held, timing)]
