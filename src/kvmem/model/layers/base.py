"""``KVLayer``: the one protocol every layer kind meets (paged, sliding, per-head, mixed, offload).

A layer kind is one file in this package: a small class made of ``BlockList``s (the storage), and
registered by name in ``kvmem.model.layers``. Whoever uses layers (the batched forward, the
compression policy, the snapshot code, the prefix cache) talks to this protocol only, never to a
concrete class:

- attention: ``past`` (what new queries may attend to, as block views), ``write`` (store new
  tokens), ``retrieve`` (keys fetched for these queries from elsewhere: offloaded blocks);
- sizes: ``nbytes``, ``cost_of_blocks``, ``bytes_to_append``, ``max_bytes_to_grow``;
- eviction: ``scoring`` (what a scorer reads), ``keep_slots`` / ``keep_mask`` (what stays), and
  the ``before_forward`` / ``after_forward`` hooks;
- state: ``parts`` (the named block lists), ``copy_to``, ``release``, ``check``.

It is also a transformers ``CacheLayerMixin``, so a ``KVMemCache`` works as a plain transformers
cache (batch size 1) with any model, through ``update``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from transformers.cache_utils import CacheLayerMixin

from kvmem.errors import KVMemError
from kvmem.kv.pool import KVPool
from kvmem.model.format import Quantizer, TokenFormat
from kvmem.model.layers.blocks import BlockList
from kvmem.model.past import Past


class UnsupportedLayerError(KVMemError):
    """A layer kind was asked for something it does not do (evicting from a sliding window, …)."""


@dataclass(frozen=True)
class LayerParams:
    """What every layer kind is built from (its own options come besides): the pool its blocks live
    in, on ``device``; their shape (``num_heads`` KV heads of ``head_dim`` in ``dtype``); its place
    in the model (``layer_idx``, a sliding ``window``); the block format of its full blocks (None:
    full precision) and of the block being filled (``residual``; None: the model's dtype)."""

    pool: KVPool
    num_heads: int
    head_dim: int
    dtype: torch.dtype
    layer_idx: int = 0
    window: int | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    fmt: Quantizer | None = None
    residual: TokenFormat | None = None


class Kept(NamedTuple):
    """What an eviction keeps of a layer's scored slots (``KVLayer.keep_slots``' arguments)."""

    chosen: torch.Tensor  # [H, k] scored slots, ascending per head
    capacity: int | None  # the layer's token capacity, for kinds that need it
    keys: torch.Tensor | None  # [H, k, D] made of the chosen slots (merging); None: theirs
    values: torch.Tensor | None
    need: int  # tokens the next forward adds


class KVLayer(CacheLayerMixin, ABC):
    """One layer of one sequence, stored in pool blocks.

    Mutating calls: ``write``, ``keep_slots``, ``keep_mask``, the hooks, ``release``. Reading calls
    (``past``, ``scoring``, sizes) never change the layer. ``retrieve`` may fetch blocks into the
    pool (offload) and may raise ``KVBudgetError``.
    """

    kind: ClassVar[str]  # the registry name, saved with snapshots
    is_compileable = False
    is_croppable = False

    def __init__(self, params: LayerParams) -> None:
        super().__init__()
        self.pool = params.pool
        self.num_heads, self.head_dim = params.num_heads, params.head_dim
        self.dtype = params.dtype
        self.device = params.device
        self.layer_idx = params.layer_idx
        self.window = params.window
        self.is_sliding = params.window is not None  # transformers' Cache reads it to pick each mask's layer
        # What compression scorers read, kept by ``kvmem.compress.observe.Observer``.
        self.scaling: float | None = None  # the attention's softmax scale, once observed
        self.recent_queries: torch.Tensor | None = None  # [Hq, w, D]
        self.attention: torch.Tensor | None = None  # [H, held] attention received since arrival

    @property
    def keep(self) -> int | None:
        """Past tokens a future query may attend to (None: all)."""
        return None if self.window is None else self.window - 1

    # --- storage, per kind
    @abstractmethod
    def parts(self) -> dict[str, BlockList]:
        """The block lists holding this layer's tokens, by a name suffix ("" for a single one)."""

    @property
    @abstractmethod
    def held(self) -> int:
        """Tokens held per head (what a layer budget counts)."""

    @property
    def tokens_held(self) -> int:
        """Tokens whose keys and values the pool holds for this layer, per head, at any precision
        (``held``, unless a kind keeps tokens besides those its budget counts: mixed precision)."""
        return self.held

    @property
    @abstractmethod
    def seq_length(self) -> int:
        """Tokens of the sequence this layer has seen."""

    @abstractmethod
    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the keys and values of new tokens: [H, q, D] each."""

    @abstractmethod
    def past(self) -> Past:
        """The held tokens new queries may attend to, as views (call before ``write``)."""

    def retrieve(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys and values ([1, H, n, D]) fetched for ``query`` ([1, Hq, q, D]) besides the held
        ones, all in the queries' past; None when the layer has none to fetch."""
        return None

    @abstractmethod
    def cost_of_blocks(self, n: int) -> int:
        """Most bytes the layer holds with ``n`` blocks' worth of tokens per head."""

    @abstractmethod
    def bytes_to_append(self, q: int) -> tuple[int, int]:
        """(bytes held now, most bytes held after appending ``q`` tokens in one forward)."""

    @abstractmethod
    def max_bytes_to_grow(self, n: int) -> int:
        """Most bytes the layer can hold while ``n`` more tokens arrive, in chunks of any size."""

    @abstractmethod
    def copy_to(self, pool: KVPool) -> KVLayer:
        """An independent copy whose blocks live in ``pool`` (a forked sequence)."""

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts().values())

    def stream(self) -> BlockList:
        """The one block list of a layer whose blocks are token-aligned and shareable (a prefix)."""
        raise UnsupportedLayerError(f"a {self.kind} layer's blocks cannot be shared as a prefix")

    # --- eviction (full-attention kinds that support it override these)
    def scoring(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """What an eviction scorer reads: keys, values [H, T, D] (a copy), the attention each
        token received [H, T] (or None), and validity [H, T] (None: every slot holds a token)."""
        raise UnsupportedLayerError(f"a {self.kind} layer is not evicted from")

    def keep_slots(
        self,
        chosen: torch.Tensor,
        capacity: int | None = None,
        kept_keys: torch.Tensor | None = None,
        kept_values: torch.Tensor | None = None,
        need: int = 0,
    ) -> None:
        """Keep the scored slots ``chosen`` ([H, k], ascending per head), or ``kept_keys`` /
        ``kept_values`` ([H, k, D]) made of them (merging); what happens to the rest is the kind's
        (freed, or demoted). ``capacity``: the layer's token capacity, for kinds that need it;
        ``need``: tokens the next forward adds (mixed precision leaves their room)."""
        self.evict(Kept(chosen, capacity, kept_keys, kept_values, need))

    def evict(self, kept: Kept) -> None:
        """``keep_slots``, as this kind does it (kinds that are not evicted from refuse)."""
        raise UnsupportedLayerError(f"a {self.kind} layer is not evicted from")

    def capacity_for(self, capacity: int, need: int) -> int:
        """Tokens this layer may keep at its own precision once ``need`` more arrive, within the
        bytes of ``capacity`` (mixed precision: fewer as it holds more, the others demoted)."""
        return capacity

    def keep_mask(self, mask: torch.Tensor) -> None:
        """Keep the scored slots where ``mask`` ([H, T] bool) is True; heads may keep different counts."""
        raise UnsupportedLayerError(f"a {self.kind} layer keeps the same tokens in every head")

    def valid(self) -> torch.Tensor | None:
        """[H, T] bool over the scored slots, False on a head's padding; None when there is none."""
        return None

    def before_forward(self, q: int) -> None:
        """Called before a forward of ``q`` tokens (offload: make room, or refuse)."""

    def after_forward(self) -> None:
        """Called after each forward (offload: move old blocks out)."""

    def set_room(self, room: int | None) -> None:
        """The bytes this layer may hold in RAM, for kinds that size themselves (offload)."""

    def min_bytes(self, tokens: int) -> int:
        """Least RAM the layer needs to serve ``tokens`` tokens in all (0: no floor of its own)."""
        return 0

    # --- common to every kind
    def check(self) -> None:
        """Raise ``AssertionError`` if the layer's bookkeeping is inconsistent."""
        for part in self.parts().values():
            part.check()

    def release(self) -> None:
        """Give every block back to the pool; the layer is empty afterwards."""
        for part in self.parts().values():
            part.release()
        self.recent_queries = self.attention = None

    def _copy_state(self, new: KVLayer) -> None:
        new.recent_queries = None if self.recent_queries is None else self.recent_queries.clone()
        new.attention = None if self.attention is None else self.attention.clone()

    # --- transformers' CacheLayerMixin: the plain path (one sequence, any model)
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: [1, H, q, D] -> keys, values attended: [1, H, T + q, D]
        if key_states.shape[0] != 1:
            raise ValueError("kvmem's cache holds one sequence per cache object (batch size 1)")
        self.is_initialized = True
        past = self.past()
        self.write(key_states[0], value_states[0])
        if past.count == 0:
            return key_states, value_states
        keys, values = past.dense()
        return torch.cat([keys[None], key_states], dim=2), torch.cat([values[None], value_states], dim=2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.held + query_length, self.seq_length - self.held

    def get_seq_length(self) -> int:
        return self.seq_length

    def get_max_length(self) -> int:
        return -1 if self.window is None else self.window

    def reset(self) -> None:
        self.release()
