"""A request's life in the engine: its sequence, sampling, stop strings, status and timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

import torch

from kvmem.engine.result import GenerationResult
from kvmem.engine.sampling import SamplingParams
from kvmem.engine.sequence import Sequence
from kvmem.engine.text import StopMatcher
from kvmem.tiers.swap import SwapHandle


class Status(Enum):
    WAITING = "waiting"  # queued, holds no blocks (a request preempted by recomputation comes back here)
    RUNNING = "running"  # admitted: holds its blocks and a reservation for what it may still grow
    SWAPPED = "swapped"  # preempted: its blocks wait in the swap space
    FINISHED = "finished"


class RequestOutput(NamedTuple):
    """What one step did for one request: the text and tokens it added; ``result`` once finished,
    or ``error`` if it ended without one (refused by its policy or the pool)."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    result: GenerationResult | None = None
    error: Exception | None = None


@dataclass(eq=False)
class Request:
    """One generation request. ``owns_sequence``: its blocks are freed when it ends (a chat turn's
    sequence stays with the chat instead)."""

    request_id: str
    seq: Sequence
    params: SamplingParams
    max_new_tokens: int
    matcher: StopMatcher
    eos: frozenset[int]
    owns_sequence: bool = True
    status: Status = Status.WAITING
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: Exception | None = None
    swap: SwapHandle | None = None
    swap_growth: int = 0  # its reservation when it was swapped out
    waited: bool = False  # waited at least one step for room in the pool
    admitted: int = -1  # admission order: the newest running request is preempted first
    preemptions: int = 0
    prompt_tokens: int = 0
    tokens_prefilled: int = 0  # prompt tokens computed (not reused from the prefix cache)
    tokens_reused: int = 0
    arrival: float = field(default_factory=time.perf_counter)
    first_scheduled: float | None = None
    first_token: float | None = None
    result: GenerationResult | None = None
    peak_kv_bytes: int = 0
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        self.prompt_tokens = len(self.seq.token_ids)
        if not self.params.greedy:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def new_tokens_left(self, limit: int | None = None) -> int:
        """New tokens the cache may still have to take besides the pending ones: each token still
        to generate but the last (sampled, never computed); at most ``limit`` if given."""
        new = max(0, self.max_new_tokens - len(self.generated) - 1)
        return new if limit is None else min(new, limit)
