"""kvmem's transformers ``Cache``: every key and value lives in blocks of the ``KVPool``.

This is the public extension point transformers offers (a ``Cache`` made of ``CacheLayerMixin``
layers), so any decoder that takes a transformers cache (``cache``, formerly ``past_key_values``)
works unchanged. Each layer appends the new keys/values to its blocks and hands attention the
keys/values it needs, gathered from the blocks into one transient tensor (transformers' own
``DynamicCache`` copies the same amount at every step with ``torch.cat``).

A sliding-window layer keeps only the last ``window - 1`` tokens (plus at most one partly filled
block), exactly what transformers' ``DynamicSlidingWindowLayer`` keeps: blocks that fall out of
the window are freed, which is real memory saved.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvmem.compress.mixed import MixedPrecision
from kvmem.compress.offload import Offload
from kvmem.compress.quantizer import Quantizer
from kvmem.kv.pool import KVPool, block_nbytes
from kvmem.kv.table import BlockTable
from kvmem.model.spec import ModelSpec


class PagedLayer(CacheLayerMixin):
    """One layer of one sequence, stored in pool blocks. Batch size 1."""

    is_compileable = False
    is_croppable = False

    def __init__(
        self,
        pool: KVPool,
        num_heads: int,
        head_dim: int,
        window: int | None,
        dtype: torch.dtype,
        layer_idx: int = 0,
        quant: Quantizer | None = None,
    ) -> None:
        super().__init__()
        self.pool = pool
        self.quant = quant
        self.layout = None if quant is None else quant.layout(num_heads, pool.block_size, head_dim)
        self.layer_idx = layer_idx
        self.scaling: float | None = None  # the attention's softmax scale, once observed
        self.dtype, self.device = dtype, torch.device("cpu")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.window = window
        self.is_sliding = window is not None
        self.table = BlockTable(pool.block_size)
        # Views of each block's keys and values ([H, bs, D]), in table order. Kept rather than
        # re-sliced at every step: making thousands of views per step costs more than the copy.
        # A quantized block has None there and its byte buffer in `_packed`.
        self._keys: list[torch.Tensor | None] = []
        self._values: list[torch.Tensor | None] = []
        self._packed: list[torch.Tensor | None] = []
        # Statistics kept for compression scorers (see kvmem.compress.observe).
        self.recent_queries: torch.Tensor | None = None  # [Hq, w, D]
        self.attention: torch.Tensor | None = None  # [H, held]

    @property
    def held(self) -> int:
        """Tokens held per head."""
        return self.table.num_held

    @property
    def seq_length(self) -> int:
        """Tokens of the sequence this layer has seen."""
        return self.table.length

    def valid(self) -> torch.Tensor | None:
        """[H, T] bool, False where ``gather`` pads a head; None: every head holds every slot."""
        return None

    def check(self) -> None:
        """Raise ``AssertionError`` if the layer's bookkeeping is inconsistent."""
        self.table.check()
        assert len(self._keys) == len(self._values) == len(self._packed) == len(self.table.block_ids)

    @property
    def keep(self) -> int | None:
        """Past tokens a future query may attend to (None: all)."""
        return None if self.window is None else self.window - 1

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: [1, H, q, D]
        if key_states.shape[0] != 1:
            raise ValueError("kvmem's cache holds one sequence per cache object (batch size 1)")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.keep is None:
            self._store(key_states[0], value_states[0])
            return self.gather()
        # Sliding window: attention sees the last `keep` past tokens plus the new ones.
        past_k, past_v = self.gather(last=self.keep)
        self._append(key_states[0], value_states[0])
        return torch.cat([past_k, key_states], dim=-2), torch.cat([past_v, value_states], dim=-2)

    def _store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Where a full-attention layer puts new tokens ([H, q, D]); layouts with inner layers
        (per-head, high/low precision) override this, ``update`` stays one."""
        self._append(k, v)

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v: [H, q, D]
        table, bs = self.table, self.table.block_size
        plan = table.plan_append(k.shape[1], self.keep)
        for _ in range(plan.drop_blocks):
            self.pool.decref(table.block_ids.pop(0))
            self._keys.pop(0)
            self._values.pop(0)
            self._packed.pop(0)
            table.start += bs
        table.length += plan.skip_tokens
        if not table.block_ids:
            table.start = table.length
        k, v = k[:, plan.skip_tokens :], v[:, plan.skip_tokens :]
        written, q = 0, k.shape[1]
        while written < q:
            fill = table.last_fill
            if not table.block_ids or fill == bs:
                if table.block_ids and self.quant is not None and self._packed[-1] is None:
                    self._quantize_last()
                block_id = self.pool.allocate(self.num_heads, self.head_dim, k.dtype, k.device)
                table.block_ids.append(block_id)
                block = self.pool.tensor(block_id)  # [2, H, bs, D]
                self._keys.append(block[0])
                self._values.append(block[1])
                self._packed.append(None)
                fill = 0
            n = min(bs - fill, q - written)
            last_k, last_v = self._keys[-1], self._values[-1]
            assert last_k is not None and last_v is not None
            last_k[:, fill : fill + n] = k[:, written : written + n]
            last_v[:, fill : fill + n] = v[:, written : written + n]
            written += n
            table.length += n

    def _quantize_last(self) -> None:
        """The last block is full: replace it with its quantized form (the residual moves on)."""
        assert self.quant is not None and self.layout is not None
        keys, values = self._keys[-1], self._values[-1]
        assert keys is not None and values is not None
        block_id = self.pool.allocate_raw(self.layout.nbytes, keys.device)
        packed = self.pool.tensor(block_id)
        self.quant.encode(keys, values, self.layout, packed)
        self.pool.decref(self.table.block_ids[-1])
        self.table.block_ids[-1] = block_id
        self._keys[-1] = self._values[-1] = None
        self._packed[-1] = packed

    def _parts(self, first: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-block keys and values ([H, bs, D]) from block ``first`` on, dequantized where needed."""
        keys = self._keys[first:]
        values = self._values[first:]
        packed = [(i, b) for i, b in enumerate(self._packed[first:]) if b is not None]
        if packed:  # every quantized block of the layer in one decode: [N, nbytes] -> [N, H, bs, D]
            assert self.quant is not None and self.layout is not None
            stacked = torch.stack([b for _, b in packed])
            dk, dv = (t.contiguous() for t in self.quant.decode(stacked, self.layout, self.dtype))
            for (i, _), k, v in zip(packed, dk.unbind(0), dv.unbind(0)):
                keys[i], values[i] = k, v
        assert all(k is not None for k in keys) and all(v is not None for v in values)
        return keys, values  # type: ignore[return-value]

    def gather(self, last: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the held tokens (only the ``last`` ones if given): [1, H, T, D] each."""
        if not self._keys:
            empty = torch.empty((1, self.num_heads, 0, self.head_dim), dtype=self.dtype, device=self.device)
            return empty, empty
        bs, fill = self.table.block_size, self.table.last_fill
        skip = 0 if last is None else max(0, self.table.num_held - last)
        first, offset = divmod(skip, bs)
        parts_k, parts_v = self._parts(first)
        keys = _concat(parts_k, 0, offset, fill)
        values = _concat(parts_v, 0, offset, fill)
        return keys.unsqueeze(0), values.unsqueeze(0)

    @property
    def block_bytes(self) -> int:
        """Bytes of a full-precision block."""
        return block_nbytes(self.num_heads, self.head_dim, self.table.block_size, self.dtype)

    def cost_of_blocks(self, n: int) -> int:
        """Most bytes the layer holds with ``n`` blocks: with quantization, all but the last are
        quantized, plus one quantized block while the next full one is being converted."""
        if self.layout is None or n == 0:
            return n * self.block_bytes
        return n * self.layout.nbytes + self.block_bytes

    def bytes_to_append(self, q: int) -> tuple[int, int]:
        """(bytes held now, bytes held after appending ``q`` tokens in one forward)."""
        blocks_after = self.table.plan_append(q, self.keep).blocks_after
        return len(self.table.block_ids) * self.block_bytes, blocks_after * self.block_bytes

    def max_bytes_to_grow(self, n: int) -> int:
        """Most bytes this layer can hold while ``n`` more tokens arrive, in chunks of any size.

        A full layer holds every token. A sliding layer's first block always still holds a token
        of the window, so it holds at most ``keep + block_size - 1`` tokens, however they came.
        """
        bs = self.table.block_size
        blocks = -(-(self.table.num_held + n) // bs)
        if self.keep is not None:
            blocks = min(blocks, -(-(self.keep + bs - 1) // bs))
        return self.cost_of_blocks(max(blocks, len(self.table.block_ids)))

    @property
    def nbytes(self) -> int:
        return sum(self.pool.manager.size_of(b) for b in self.table.block_ids)

    @torch.inference_mode()
    def compact(
        self,
        keep: torch.Tensor,
        kept_keys: torch.Tensor | None = None,
        kept_values: torch.Tensor | None = None,
    ) -> None:
        """Keep only the slots ``keep`` ([H, k], ascending per head) and free the blocks left over.

        Each head may keep different tokens: slot ``j`` of head ``h`` becomes ``keep[h, j]`` (or
        ``kept_keys[h, j]`` / ``kept_values[h, j]`` when given, e.g. after merging). The
        kept keys and values move to the front of the layer's own blocks, so no block is
        allocated; the emptied blocks go back to the pool. Only full-attention layers compact.
        """
        assert self.window is None, "sliding-window layers are bounded by their window"
        heads, k = keep.shape
        keys, values = self.gather()  # [1, H, T, D]
        index = keep.unsqueeze(-1).expand(heads, k, self.head_dim)
        # [H, k, D]: the kept tokens, or what the caller made of them (merging)
        kept_k = keys[0].gather(1, index) if kept_keys is None else kept_keys
        kept_v = values[0].gather(1, index) if kept_values is None else kept_values
        bs, table = self.table.block_size, self.table
        if self.quant is not None:  # re-store the kept tokens (full blocks are quantized again)
            length, attention, queries = table.length, self.attention, self.recent_queries
            self.release()
            self.table.start = self.table.length = length - k
            self._append(kept_k, kept_v)
            self.recent_queries = queries
            self.attention = None if attention is None else attention.gather(1, keep)
            return
        needed = -(-k // bs)
        for i in range(needed):
            n = min(bs, k - i * bs)
            keys_i, values_i = self._keys[i], self._values[i]
            assert keys_i is not None and values_i is not None
            keys_i[:, :n] = kept_k[:, i * bs : i * bs + n]
            values_i[:, :n] = kept_v[:, i * bs : i * bs + n]
        for block_id in table.block_ids[needed:]:
            self.pool.decref(block_id)
        del table.block_ids[needed:], self._keys[needed:], self._values[needed:], self._packed[needed:]
        table.start = table.length - k  # held tokens: the last k of the sequence's positions
        if self.attention is not None:
            self.attention = self.attention.gather(1, keep)

    def adopt(self, block_ids: list[int], start: int, length: int) -> None:
        """Hold shared full blocks (a cached prefix) as this empty layer's tokens ``[start, length)``.

        Each block gets one more reference. They are never written: every block is full, so the
        next token goes to a new block (a quantized block stays quantized).
        """
        assert not self.table.block_ids and (length - start) == len(block_ids) * self.table.block_size
        for block_id in block_ids:
            self.pool.incref(block_id)
            block = self.pool.tensor(block_id)
            packed = block.dtype == torch.uint8 and self.quant is not None
            self._keys.append(None if packed else block[0])  # block: [2, H, bs, D] or packed bytes
            self._values.append(None if packed else block[1])
            self._packed.append(block if packed else None)
            self.device = block.device
        self.table.block_ids = list(block_ids)
        self.table.start, self.table.length = start, length
        self.is_initialized = True

    def drop_block(self, i: int) -> None:
        """Free block ``i``, a full one: its tokens leave the layer (the others keep their order)."""
        table, bs = self.table, self.table.block_size
        assert self.window is None and (i < len(table.block_ids) - 1 or table.last_fill == bs)
        self.pool.decref(table.block_ids.pop(i))
        del self._keys[i], self._values[i], self._packed[i]
        table.start += bs

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        length = self.table.length
        if self.window is None:
            # after compaction the held keys stand for earlier positions: all visible to new queries
            return self.table.num_held + query_length, self.table.start
        kv_offset = max(length - self.window + 1, 0)
        kv_length = (self.window - 1 if length >= self.window else length) + query_length
        return kv_length, kv_offset

    def get_seq_length(self) -> int:
        return self.table.length

    def get_max_length(self) -> int:
        return -1 if self.window is None else self.window

    def copy_to(self, pool: KVPool) -> PagedLayer:
        """An independent copy of this layer whose blocks live in ``pool`` (same block size)."""
        new = copy.copy(self)
        new.pool = pool
        new.table = BlockTable(pool.block_size)
        new.table.start, new.table.length = self.table.start, self.table.length
        new._keys, new._values, new._packed = [], [], []
        for block_id, packed in zip(self.table.block_ids, self._packed):
            source = self.pool.tensor(block_id)
            if packed is None:  # [2, H, bs, D]
                copy_id = pool.allocate(self.num_heads, self.head_dim, source.dtype, source.device)
            else:
                copy_id = pool.allocate_raw(source.numel(), source.device)
            block = pool.tensor(copy_id)
            block.copy_(source)
            new.table.block_ids.append(copy_id)
            new._keys.append(None if packed is not None else block[0])
            new._values.append(None if packed is not None else block[1])
            new._packed.append(block if packed is not None else None)
        new.recent_queries = None if self.recent_queries is None else self.recent_queries.clone()
        new.attention = None if self.attention is None else self.attention.clone()
        return new

    def blocks(self) -> list[tuple[torch.Tensor, bool]]:
        """Each block's pool tensor in table order, and whether it is quantized (a uint8 buffer)
        rather than keys and values ([2, H, bs, D]). The tensors are the pool's: do not write."""
        return [(self.pool.tensor(b), p is not None) for b, p in zip(self.table.block_ids, self._packed)]

    def add_block(self, source: torch.Tensor, packed: bool) -> None:
        """Append a block holding a copy of ``source`` (as ``blocks`` gives them), allocated in
        the pool (may raise ``KVBudgetError``). The caller sets the table's ``start`` and
        ``length`` once every block is in (restoring saved state)."""
        if packed:
            block_id = self.pool.allocate_raw(source.numel(), self.device)
        else:
            block_id = self.pool.allocate(self.num_heads, self.head_dim, source.dtype, self.device)
        self.table.block_ids.append(block_id)
        block = self.pool.tensor(block_id)
        block.copy_(source)
        self._keys.append(None if packed else block[0])
        self._values.append(None if packed else block[1])
        self._packed.append(block if packed else None)

    def release(self) -> None:
        """Give every block back to the pool; the layer is empty afterwards."""
        for block_id in self.table.block_ids:
            self.pool.decref(block_id)
        self.table = BlockTable(self.pool.block_size)
        self._keys, self._values, self._packed = [], [], []
        self.recent_queries = self.attention = None

    def reset(self) -> None:
        self.release()


def _concat(views: list[torch.Tensor], first: int, offset: int, fill: int) -> torch.Tensor:
    """Tokens from slot ``offset`` of block ``first`` to slot ``fill`` of the last block: [H, T, D].

    Whole blocks are concatenated and the result sliced: ``torch.cat`` has a fast path only when
    every input is contiguous, and a partly filled block's slice is not.
    """
    parts = views[first:]
    bs = parts[0].shape[1]
    whole = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # [H, n * bs, D]
    return whole[:, offset : (len(parts) - 1) * bs + fill]


def offload_dir() -> Path:
    """Where offloaded blocks go: ``$KVMEM_OFFLOAD_DIR``, else ``<kvmem cache folder>/offload``."""
    from kvmem.model.loader import cache_dir

    env = os.environ.get("KVMEM_OFFLOAD_DIR")
    return Path(env).expanduser() if env else cache_dir() / "offload"


class KVMemCache(Cache):
    """A transformers ``Cache`` for one sequence whose keys and values live in a ``KVPool``.

    ``ragged=True`` gives each full-attention layer per-head storage (``RaggedLayer``), for
    policies whose heads keep different numbers of tokens (AdaKV); ``mixed`` gives each a
    low-precision store for demoted tokens (``MixedLayer``).
    """

    def __init__(
        self,
        pool: KVPool,
        spec: ModelSpec,
        quant: Quantizer | None = None,
        ragged: bool = False,
        mixed: MixedPrecision | None = None,
        offload: Offload | None = None,
    ) -> None:
        # all build on PagedLayer, defined above
        from kvmem.model.mixed import MixedLayer
        from kvmem.model.offload import OffloadLayer, OffloadStore
        from kvmem.model.ragged import RaggedLayer

        self.pool = pool
        self.spec = spec
        h, d = spec.num_kv_heads, spec.head_dim
        self.offload_store = None if offload is None else OffloadStore(offload_dir())
        layers: list[PagedLayer] = []
        for i, w in enumerate(spec.windows):
            if w is None and offload is not None and self.offload_store is not None:
                layers.append(OffloadLayer(pool, h, d, spec.dtype, i, offload, self.offload_store))
            elif w is None and ragged:
                layers.append(RaggedLayer(pool, h, d, spec.dtype, i, quant))
            elif w is None and mixed is not None:
                layers.append(MixedLayer(pool, h, d, spec.dtype, i, quant, mixed.low, mixed.low_share))
            else:
                layers.append(PagedLayer(pool, h, d, w, spec.dtype, i, quant))
        super().__init__(layers=layers)  # type: ignore[arg-type]
        self.layer_weights: list[float] | None = None  # a compression policy's per-layer shares

    @property
    def paged_layers(self) -> list[PagedLayer]:
        return self.layers  # type: ignore[return-value]

    @property
    def num_tokens(self) -> int:
        """Tokens of the sequence the cache has seen (its length)."""
        return self.get_seq_length()

    @property
    def nbytes(self) -> int:
        """Bytes of pool blocks this sequence holds."""
        return sum(layer.nbytes for layer in self.paged_layers)

    def bytes_needed(self, q: int) -> int:
        """Extra bytes the pool must have free to append ``q`` tokens to every layer.

        Layers run in order and a sliding layer frees its expired blocks before it allocates, so
        the peak is the largest of (layers done: after, layers to come: before) over the forward.
        """
        sizes = [layer.bytes_to_append(q) for layer in self.paged_layers]
        now = sum(before for before, _ in sizes)
        peak, running = now, now
        for before, after in sizes:
            running += after - before
            peak = max(peak, running)
        return peak - now

    def bytes_to_grow(self, n: int) -> int:
        """Extra bytes that always suffice for ``n`` more tokens, whatever the chunking."""
        return sum(layer.max_bytes_to_grow(n) for layer in self.paged_layers) - self.nbytes

    def copy_to(self, pool: KVPool) -> KVMemCache:
        """An independent copy of this cache in ``pool`` (e.g. to branch a sequence)."""
        new = copy.copy(self)
        new.pool = pool
        new.layers = [layer.copy_to(pool) for layer in self.paged_layers]
        new.layer_weights = None if self.layer_weights is None else list(self.layer_weights)
        if self.offload_store is not None:  # offloaded blocks never change: the copy shares them
            self.offload_store.users += 1
        return new

    def release(self) -> None:
        for layer in self.paged_layers:
            layer.release()
        if self.offload_store is not None:
            self.offload_store.release()
            self.offload_store = None
