"""``Offload``: contexts larger than the RAM budget — old blocks on disk, a summary of each in RAM,
and at every forward only the blocks most relevant to the current queries fetched back.

What it does, per full-attention layer (``kvmem.model.layers.offload.OffloadLayer`` holds the state):

- RAM always holds the first ``sinks`` blocks (attention sinks), the last ``recent`` full blocks
  and the partly filled one. After each forward every other block is written to an offload store
  (the disk tier's checked file format, in a folder of its own) and freed from the pool.
- Each offloaded block leaves a summary in the pool: the per-channel minimum and maximum of its
  keys for every KV head ([2, H, D] float32). This is Quest's page summary (Tang et al., 2024).
- At each forward, for each layer, the queries bound every offloaded block's attention logit from
  above with Quest's bound ``sum_d max(q_d * min_d, q_d * max_d)``; the blocks with the highest
  bound are fetched (from RAM if still cached, else from disk) and attended together with the
  resident tokens. Fetched blocks stay cached in RAM, least recently used first out, within what
  the budget leaves after the resident blocks and the summaries.

With a block format (``offload+rotk4v2+res8``, ``offload+kivi4``) the resident, offloaded and
fetched blocks are all the format's packed bytes, and with ``res8`` the block being filled too,
so the resident floor and each fetch cost a fraction of a full-precision block (about a ninth
for ``rotk4v2`` in float32): offloading then runs at budgets where the full-precision floor
alone would exceed them.

Simplifications, said plainly: Quest selects pages per query head and keeps the whole cache on
the GPU; here one selection per layer serves all heads (the largest bound over heads and over
the forward's queries), so a fetched block is read once for every head. ShadowKV and InfLLM
offload to CPU memory and prefetch asynchronously; here the store is a folder and reads are
synchronous. A prefill chunk's queries share one selection. Summaries grow with the context
(1.6% of a block for SmolLM2 at 64-token blocks), so a budget bounds the context it can serve;
a request beyond that is refused up front with ``KVBudgetError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from kvmem.compress.part import Part
from kvmem.errors import InvalidBudgetError
from kvmem.model.format import Quantizer, TokenFormat
from kvmem.model.layers import LayerSpec
from kvmem.model.layers.offload import quest_bounds

if TYPE_CHECKING:
    from kvmem.compress.policy import Policy

__all__ = ["Offload", "quest_bounds"]


@dataclass(frozen=True)
class Offload(Part):
    name: ClassVar[str] = "offload"
    summary: ClassVar[str] = (
        "offloaded retrieval: old blocks on disk, Quest key bounds in RAM, the most relevant fetched back"
    )
    slot: ClassVar[str] = "offload"
    bounds: ClassVar[bool] = True
    shares_prefix: ClassVar[bool] = False  # its blocks live in a folder of the running process
    excludes: ClassVar[tuple[str, ...]] = ("scorer", "allocator", "heads", "mixed", "merge")
    sinks: int = 1  # leading blocks always resident
    recent: int = 2  # trailing full blocks always resident (plus the partly filled one)

    def __post_init__(self) -> None:
        if self.sinks < 0 or self.recent < 1:
            raise ValueError("offload needs sinks >= 0 and recent >= 1 blocks")

    def excluded(self, slots: list[str]) -> str:
        examples = "offload+rotk4v2+res8, offload+rotk4v2+sliding-rot2+res6"
        return f"offload combines with block formats only ({examples})"

    def check(self, policy: Policy) -> None:
        if policy.budget.bytes is None:
            raise InvalidBudgetError("offload needs a KV budget in bytes: the RAM its layers may hold")

    def layer_spec(self, fmt: Quantizer | None, residual: TokenFormat | None) -> LayerSpec:
        return LayerSpec("offload", fmt, (("sinks", self.sinks), ("recent", self.recent)), residual)

    def chunk(self, block_size: int) -> int:
        """Tokens per forward: a prefill chunk adds at most ``recent`` blocks before offloading."""
        return self.recent * block_size

    @property
    def resident_blocks(self) -> int:
        """Most blocks a layer holds in RAM during a forward (sinks, recent, partial, a chunk)."""
        return self.sinks + 2 * self.recent + 1
