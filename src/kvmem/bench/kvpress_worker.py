"""The kvpress side of the kvpress peer: run inside ``.venv-peers`` (``make bench-peers``), by path::

    .venv-peers/bin/python src/kvmem/bench/kvpress_worker.py job.json out.json

It imports no kvmem code (kvpress pins an older transformers than kvmem's), and only the standard
library at module level, so kvmem can read ``PRESSES`` without kvpress installed.

Job (``SCHEMA``)::

    {"schema": "kvmem.kvpress-job/1", "model": "<model folder>", "threads": 2,
     "items": [{"id": 0, "conversation": 0, "context": "...", "question": "...", "answer": " 71432",
                "max_new_tokens": 9, "press": "snapkv", "compression_ratio": 0.75}, ...]}

Items with the same ``conversation`` share one cache, in item order, as kvmem's multiturn mode:
the first item's ``context`` (encoded with the tokenizer's special tokens) is prefilled under the
press, which compresses it once, query-agnostically; then each item's ``question`` follows
uncompressed, after the previous item's answer, and is answered greedily (``max_new_tokens``, or
until end of sequence). An empty question answers straight from the context's prefill (kvmem's
single mode sends context + question as the context; real text sends its continuation as the
answer with ``max_new_tokens`` 0). The gold ``answer``'s log-probability is teacher-forced on a
deep copy of the cache taken after the question, so it does not disturb the answer. An item with
``"logp": true`` (real text) also has its teacher-forced log-probabilities saved beside ``out.json``
(``logp-<id>.pt``: float32 [N, V], one row per answer token), so kvmem can take their KL against
its full cache's.

Output: ``{"schema": ..., "versions": {...}, "results": [one per item, in item order]}``, each
``{"id", "output", "gold_logprob", "held_bytes", "attended_bytes", "full_context_bytes",
"context_tokens", "kept_tokens", "compression_ratio", "prefill_s", "decode_tokens_per_s",
"prompt_tokens", "peak_rss"}`` (and ``"logp_file"`` where saved) or ``{"id", "error"}``.
``held_bytes`` is what the cache's key and value tensors really hold (the most during the
answer); ``attended_bytes`` leaves out the entries a masking press (AdaKV) only hides from
attention, so it is what the nominal ratio promises.
``peak_rss``: the most resident memory grew during the prefill or the decoding (the gold answer's
copy left out, as kvmem does). ``prefill_s`` of a conversation's first item includes the context's.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
import traceback
from typing import Any

SCHEMA = "kvmem.kvpress-job/1"

# kvmem's name -> kvpress class names, outermost first; the innermost takes ``compression_ratio``.
# (PyramidKV is left out: its layers keep different lengths, and a question of several tokens then
# meets a causal mask sized for the first layer.)
PRESSES: dict[str, tuple[str, ...]] = {
    "snapkv": ("SnapKVPress",),
    "streamingllm": ("StreamingLLMPress",),
    "expected_attention": ("ExpectedAttentionPress",),
    "knorm": ("KnormPress",),
    "tova": ("TOVAPress",),
    "adakv": ("AdaKVPress", "ExpectedAttentionPress"),  # masks per head: frees nothing
    "adakv_snapkv": ("AdaKVPress", "SnapKVPress"),
}


def make_press(name: str, compression_ratio: float) -> Any:
    import kvpress

    if name not in PRESSES:
        raise ValueError(f"unknown kvpress press {name!r}; presses: {', '.join(PRESSES)}")
    *wrappers, inner = PRESSES[name]
    press = getattr(kvpress, inner)(compression_ratio=compression_ratio)
    for wrapper in reversed(wrappers):
        press = getattr(kvpress, wrapper)(press)
    return press


class Runner:
    """One model, loaded once; ``conversation`` runs one cache's items."""

    def __init__(self, folder: str, out_dir: str | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.out_dir = out_dir  # where log-probability files go (beside out.json)
        self.model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="sdpa"
        )
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        eos = self.model.generation_config.eos_token_id
        self.eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)

    def ids(self, text: str, special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def forward(self, cache: Any, ids: list[int], position: int, keep: int = 1) -> Any:
        """Logits [len(ids) or keep, V] after feeding ``ids`` at RoPE positions from ``position``.

        Positions count every token seen, while the (compressed) cache is shorter: as kvpress's own
        pipeline, give them explicitly."""
        torch = self.torch
        positions = torch.arange(position, position + len(ids))[None]
        out = self.model(
            input_ids=torch.tensor([ids]), past_key_values=cache, position_ids=positions, logits_to_keep=keep
        )
        return out.logits[0].float()

    def conversation(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from transformers import DynamicCache

        first = items[0]
        press = make_press(first["press"], float(first["compression_ratio"]))
        context = self.ids(first["context"], special=True)
        cache = DynamicCache()
        rss = PeakRSS()
        start = time.perf_counter()
        with press(self.model):
            logits = self.forward(cache, context, 0)[-1]  # [V]: from the full context, before pruning
        context_s = time.perf_counter() - start
        full_context = _full_bytes(cache, len(context))
        kept = cache.get_seq_length()
        position = len(context)  # tokens seen, kept or not: the next RoPE position
        pending: list[int] = []
        results = []
        for n, item in enumerate(items):
            feed = pending + self.ids(item["question"])
            rss = rss if n == 0 else PeakRSS()  # the first item's prefill counts the context's
            start = time.perf_counter()
            if feed:
                logits = self.forward(cache, feed, position)[-1]
                position += len(feed)
            prefill_s = time.perf_counter() - start + (context_s if n == 0 else 0.0)
            peak_rss = rss.growth()
            prompt_tokens = position
            held = cache_bytes(cache)
            gold = self.ids(item["answer"])
            logp = self.gold_logps(copy.deepcopy(cache), logits, gold, position)  # [N, V]
            gold_logprob = float(logp.gather(1, self.torch.tensor(gold)[:, None]).mean())
            tokens: list[int] = []
            rss = PeakRSS()
            decode_start = time.perf_counter()
            if item["max_new_tokens"] > 0:
                tokens.append(int(logits.argmax()))
                while len(tokens) < item["max_new_tokens"] and tokens[-1] not in self.eos:
                    logits = self.forward(cache, [tokens[-1]], position)[-1]
                    position += 1
                    held = max(held, cache_bytes(cache))
                    tokens.append(int(logits.argmax()))
            decode_s = time.perf_counter() - decode_start
            peak_rss = max(peak_rss, rss.growth())
            pending = tokens[-1:]  # as kvmem: the next turn feeds it with its question
            if item.get("logp") and self.out_dir is not None:
                name = f"logp-{item['id']}.pt"
                self.torch.save(logp.contiguous(), f"{self.out_dir}/{name}")
                extra = {"logp_file": name}
            else:
                extra = {}
            results.append(
                {
                    **extra,
                    "id": item["id"],
                    "output": str(self.tokenizer.decode(tokens, skip_special_tokens=True)),
                    "gold_logprob": gold_logprob,
                    "held_bytes": held,
                    "attended_bytes": held - masked_bytes(self.model, cache),
                    "full_context_bytes": full_context,
                    "context_tokens": len(context),
                    "kept_tokens": kept,
                    "compression_ratio": float(press.compression_ratio),
                    "prefill_s": prefill_s,
                    "decode_tokens_per_s": (len(tokens) - 1) / decode_s if len(tokens) > 1 else math.nan,
                    "prompt_tokens": prompt_tokens,
                    "peak_rss": peak_rss,
                }
            )
        return results

    def gold_logps(self, branch: Any, logits: Any, gold: list[int], position: int) -> Any:
        """Log-probabilities [N, V] at each token of ``gold`` after ``logits``, teacher-forced on
        ``branch``."""
        torch = self.torch
        steps = logits[None]  # [1, V]
        if len(gold) > 1:
            steps = torch.cat([steps, self.forward(branch, gold[:-1], position, keep=0)])  # [N, V]
        return torch.log_softmax(steps.float(), dim=-1)


class PeakRSS:
    """Growth of this process's resident memory from now to its peak, read from the kernel's
    high-water mark (``VmHWM``), reset on creation; 0 where that cannot be reset (not Linux)."""

    def __init__(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.start: int | None = _status_bytes("VmRSS")
        except OSError:
            self.start = None

    def growth(self) -> int:
        return 0 if self.start is None else max(0, _status_bytes("VmHWM") - self.start)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise OSError(f"no {field} in /proc/self/status")


def cache_bytes(cache: Any) -> int:
    """Bytes the cache's key and value tensors really hold."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None and hasattr(tensor, "numel"):
                total += tensor.numel() * tensor.element_size()
    return total


def _full_bytes(cache: Any, tokens: int) -> int:
    """What the uncompressed context would hold: every layer's bytes per token times ``tokens``."""
    total = 0
    for layer in cache.layers:
        keys, values = layer.keys, layer.values  # [B, H, T, D]
        per_token = (keys[:, :, :1].numel() + values[:, :, :1].numel()) * keys.element_size()
        total += per_token * tokens
    return total


def masked_bytes(model: Any, cache: Any) -> int:
    """Bytes of the key/value entries a head-wise press (AdaKV) masks instead of removing:
    kvpress keeps them in the tensors and hides them from attention with fake keys."""
    total = 0
    for module in model.modules():
        masked = getattr(module, "masked_key_indices", None)
        if masked is None or not hasattr(module, "layer_idx"):
            continue
        layer = cache.layers[module.layer_idx]
        entry = (
            layer.keys.shape[-1] * layer.keys.element_size()
            + layer.values.shape[-1] * layer.values.element_size()
        )
        total += len(masked[0]) * entry
    return total


def run(job: dict[str, Any], out_dir: str | None = None) -> dict[str, Any]:
    import torch
    import transformers

    if job.get("schema") != SCHEMA:
        raise ValueError(f"job schema {job.get('schema')!r}, expected {SCHEMA!r}")
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    runner = Runner(job["model"], out_dir)
    conversations: dict[object, list[dict[str, Any]]] = {}
    for item in job["items"]:
        conversations.setdefault(item["conversation"], []).append(item)
    by_id: dict[object, dict[str, Any]] = {}
    with torch.inference_mode():
        for items in conversations.values():
            try:
                for result in runner.conversation(items):
                    by_id[result["id"]] = result
            except Exception as e:  # one conversation failing leaves the others their results
                print(traceback.format_exc(), file=sys.stderr)
                for item in items:
                    by_id[item["id"]] = {"id": item["id"], "error": f"kvpress: {type(e).__name__}: {e}"}
    versions = {
        "kvpress": _version("kvpress"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    return {"schema": SCHEMA, "versions": versions, "results": [by_id[item["id"]] for item in job["items"]]}


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: kvpress_worker.py JOB.json OUT.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        job = json.load(f)
    import os

    out = run(job, os.path.dirname(os.path.abspath(argv[1])))
    with open(argv[1], "w") as f:
        json.dump(out, f, allow_nan=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
