"""What the connector's scheduler side decides each step: which blocks to load, which to store.

Plain Python, no vLLM: the connector hands it request ids, vLLM's block hashes (the list vLLM
keeps on each request, which grows as tokens are appended), block ids and token counts.

- ``match``: how many tokens past those vLLM already holds can come from the tier — the leading
  run of the request's full blocks whose hashes the tier holds, never the prompt's last token
  (its logits start the generation).
- ``allocated``: vLLM gave the request blocks for those tokens; they are loaded in its next step.
- ``step``: for the step's scheduled requests, the loads planned and the blocks that become full
  in this step (stored after its forward, once per block and request).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BlockRef:
    block_id: int  # vLLM's block id in this process's KV cache
    key: bytes  # vLLM's block hash
    depth: int  # the block's place in its chain (0: the first block of a prompt)


@dataclass
class StepPlan:
    """Sent to the worker with the step (vLLM's connector metadata)."""

    loads: dict[str, list[BlockRef]] = field(default_factory=dict)  # request id -> blocks to load
    stores: list[BlockRef] = field(default_factory=list)


@dataclass
class Tracked:
    hashes: Sequence[bytes]  # the request's block hashes (vLLM's own list, read live)
    block_ids: list[int] = field(default_factory=list)
    matched: tuple[int, int] = (0, 0)  # blocks [first, last) the tier holds, from the last match
    load: list[BlockRef] = field(default_factory=list)  # planned for the request's next step
    stored: int = 0  # leading blocks already stored (or loaded: they are in the tier)


@dataclass
class ScheduledNew:
    req_id: str
    block_ids: list[int]
    num_computed_tokens: int  # before this step (vLLM's local hits plus the tier's)
    num_scheduled_tokens: int


@dataclass
class ScheduledCached:
    req_id: str
    new_block_ids: list[int] | None
    resumed: bool  # new_block_ids replace the request's blocks (resumed after preemption)
    num_computed_tokens: int
    num_scheduled_tokens: int


class Planner:
    """``contains``: whether the tier holds each key (one round trip for many keys)."""

    def __init__(self, block_size: int, contains: Callable[[list[bytes]], list[bool]]) -> None:
        self.block_size = block_size
        self.contains = contains
        self.requests: dict[str, Tracked] = {}

    def match(self, req_id: str, hashes: Sequence[bytes], num_prompt_tokens: int, num_computed: int) -> int:
        """Tokens beyond ``num_computed`` the tier can supply (a whole number of blocks)."""
        tracked = self.requests.setdefault(req_id, Tracked(hashes))
        bs = self.block_size
        first, last = num_computed // bs, min(len(hashes), (num_prompt_tokens - 1) // bs)
        if num_computed % bs or first >= last:
            tracked.matched = (first, first)
            return 0
        present = self.contains(list(hashes[first:last]))
        n = next((i for i, p in enumerate(present) if not p), len(present))
        tracked.matched = (first, first + n)
        return n * bs

    def allocated(self, req_id: str, block_ids: Sequence[int], num_external_tokens: int) -> None:
        """vLLM allocated the request's blocks (all of them, in token order)."""
        tracked = self.requests.get(req_id)
        if tracked is None or num_external_tokens == 0:
            return
        first, last = tracked.matched
        n = num_external_tokens // self.block_size
        assert n <= last - first, "vLLM took more external tokens than were matched"
        tracked.load = [BlockRef(block_ids[j], tracked.hashes[j], j) for j in range(first, first + n)]

    def step(self, new: Sequence[ScheduledNew], cached: Sequence[ScheduledCached]) -> StepPlan:
        plan = StepPlan()
        for req in new:
            tracked = self.requests.setdefault(req.req_id, Tracked(()))
            tracked.block_ids = list(req.block_ids)
            # what it starts with is vLLM's own or the tier's: nothing to store there
            tracked.stored = max(tracked.stored, req.num_computed_tokens // self.block_size)
            self._plan(req.req_id, tracked, req.num_computed_tokens + req.num_scheduled_tokens, plan)
        for c in cached:
            known = self.requests.get(c.req_id)
            if known is None:
                continue
            if c.new_block_ids is not None:
                known.block_ids = list(c.new_block_ids) if c.resumed else known.block_ids + c.new_block_ids
            # vLLM went back (a block failed to load, or a preemption): what it recomputes is stored
            known.stored = min(known.stored, c.num_computed_tokens // self.block_size)
            self._plan(c.req_id, known, c.num_computed_tokens + c.num_scheduled_tokens, plan)
        return plan

    def _plan(self, req_id: str, tracked: Tracked, computed_after: int, plan: StepPlan) -> None:
        if tracked.load:
            plan.loads[req_id] = tracked.load
            tracked.stored = max(tracked.stored, tracked.matched[0] + len(tracked.load))
            tracked.load = []
        full = min(computed_after // self.block_size, len(tracked.hashes), len(tracked.block_ids))
        for j in range(tracked.stored, full):
            plan.stores.append(BlockRef(tracked.block_ids[j], tracked.hashes[j], j))
        tracked.stored = max(tracked.stored, full)

    def finished(self, req_id: str) -> None:
        self.requests.pop(req_id, None)
