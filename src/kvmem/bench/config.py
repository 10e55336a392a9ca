"""What one ``kvmem bench`` run measures: methods, budgets, tasks, lengths, mode. Frozen and recorded
with the results, so every number in a results folder says how it was made."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from kvmem.bench.kvpress_worker import PRESSES as KVPRESS_PRESSES
from kvmem.bench.registry import TASKS, UnknownTaskError
from kvmem.kv.pool import DEFAULT_BLOCK_SIZE
from kvmem.model.registry import DEFAULT_MODEL

Mode = Literal["single", "multiturn", "multirequest"]
MODES: tuple[Mode, ...] = ("single", "multiturn", "multirequest")

FULL = "full"  # kvmem with no policy: every token at full precision
HF = "hf"  # transformers' own generate() with its DynamicCache, the reference a user knows
# transformers' QuantizedCache with the optimum-quanto backend (2 or 4 bits; the 'peers' extra)
HF_QUANTO = {"hf-quanto4": 4, "hf-quanto2": 2}
PEERS = (HF, *HF_QUANTO)


def is_hf(method: str) -> bool:
    """Whether a method is a transformers peer run in this process (``hf``, ``hf-quanto4``, ...)."""
    return method in PEERS


# "<policy>@prompt": the policy compressing once after each prompt (``compress_after_prompt``), the
# prompt run at full size first; without the suffix, chunk by chunk under the budget (the default)
AFTER_PROMPT = "@prompt"


def split_method(method: str) -> tuple[str, bool]:
    """``"snapkv+kivi4@prompt"`` -> ``("snapkv+kivi4", True)``; other names -> ``(name, False)``."""
    if method.endswith(AFTER_PROMPT):
        return method.removesuffix(AFTER_PROMPT), True
    return method, False


# --- kvpress peer: "kvpress:<press>" is NVIDIA kvpress's press, run in its own venv (kvpress_peer.py)
KVPRESS = "kvpress:"


def is_kvpress(method: str) -> bool:
    return method.startswith(KVPRESS)


# --- end kvpress peer


@dataclass(frozen=True)
class BenchConfig:
    """``budgets`` are shares of the full cache's bytes for the same context (0.25: a quarter).

    Methods are kvmem policy names (``snapkv``, ``snapkv+kivi4``, …), ``full`` or the peer ``hf``;
    ``kvpress:<press>`` (``kvpress:snapkv``, …) is NVIDIA kvpress's press, under every budget.
    A method that cannot evict (a quantizer alone, ``full``, ``hf``) runs once, without a budget.
    ``length`` is the prompt length in tokens; ``contexts`` the seeded contexts per task, each asked
    all of its task's questions. ``speed_lengths``: contexts at which decode speed is measured.
    """

    model: str = DEFAULT_MODEL
    methods: tuple[str, ...] = (FULL, HF, "streamingllm", "snapkv", "kivi4", "snapkv+kivi4")
    budgets: tuple[float, ...] = (0.5, 0.25, 0.1)
    tasks: tuple[str, ...] = ("passkey", "multikey", "realtext")
    length: int = 1024
    contexts: int = 1
    mode: Mode = "multiturn"
    speed_lengths: tuple[int, ...] = (256, 1024)
    speed_tokens: int = 16
    seed: int = 0
    block_size: int = DEFAULT_BLOCK_SIZE  # EngineConfig's
    prefill_chunk: int = 512

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; modes: {', '.join(MODES)}")
        for task in self.tasks:
            if task not in TASKS:
                raise UnknownTaskError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
        if not self.methods:
            raise ValueError("no methods to run")
        for method in self.methods:
            if method.startswith("hf") and method not in PEERS:
                raise ValueError(f"unknown transformers peer {method!r}; peers: {', '.join(PEERS)}")
        for method in filter(is_kvpress, self.methods):  # kvpress peer
            if method.removeprefix(KVPRESS) not in KVPRESS_PRESSES:
                known = ", ".join(KVPRESS + p for p in KVPRESS_PRESSES)
                raise ValueError(f"unknown kvpress press {method!r}; kvpress presses: {known}")
        if any(not 0 < b <= 1 for b in self.budgets):
            raise ValueError(f"budgets are shares of the full cache within (0, 1], got {self.budgets}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.length < 64 or self.contexts < 1 or self.speed_tokens < 2:
            raise ValueError("length must be at least 64 tokens, contexts and speed_tokens positive")

    def replace(self, **changes: object) -> BenchConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


# Lengths where the full cache answers (a task it fails measures nothing). SmolLM2-135M: pass key
# 4/4 and multi-key 13/16 at 1k tokens (multiturn); at 1.5k one pass key in three is already lost
# (the haystack is Python's docs, and "pass" misleads it). Gemma 3 270M holds to about 3k.
_LENGTHS = {
    "quick": {"smollm2-135m": 1024, "gemma3-270m": 1536},
    "full": {"smollm2-135m": 1024, "gemma3-270m": 3072},
}


def suite(name: str, model: str) -> BenchConfig:
    """``quick`` (a few minutes on 2 cores, used in the README) or ``full``."""
    if name not in _LENGTHS:
        raise ValueError(f"unknown suite {name!r}; suites: {', '.join(_LENGTHS)}")
    length = _LENGTHS[name].get(model, 1024)
    if name == "quick":
        return BenchConfig(model=model, length=length, budgets=(0.25, 0.1))
    return BenchConfig(
        model=model,
        methods=(
            FULL,
            HF,
            "hf-quanto4",
            "streamingllm",
            "h2o",
            "snapkv",
            "kivi4",
            "kivi2",
            "snapkv+kivi4",
            "h2o+kivi4",
            "offload",
            "kvpress:snapkv",
            "kvpress:expected_attention",
            "kvpress:tova",
        ),
        budgets=(0.5, 0.25, 0.1),
        tasks=("passkey", "multikey", "realtext"),
        length=length,
        contexts=1,
        speed_lengths=(512, 1024, 2048),
        speed_tokens=32,
    )
