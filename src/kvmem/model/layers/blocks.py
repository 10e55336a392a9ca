"""``BlockList``: one run of tokens of one layer, in pool blocks — the storage every layer kind is made of.

It keeps a ``BlockTable`` and, per block, views of its keys and values ([H, bs, D]) or, once the
block is full and the list has a block format, its packed bytes. Views are kept rather than
re-sliced at every step: making thousands of views per step costs more than reading the blocks.

With ``keep`` set (a sliding window), blocks whose tokens all fell out of the last ``keep`` are
freed as new tokens arrive: real memory returned. With a block format (``Quantizer``), a full
block is replaced by its quantized bytes as soon as the next block starts, so the last, partly
filled block is the residual: in the model's dtype, or, with a ``TokenFormat`` (``residual``), a
byte buffer its tokens are encoded into slot by slot (``partial``), decoded for each read. With
``whole`` (a store that only ever receives whole blocks, such as mixed precision's demoted
tokens), every block is quantized as it arrives and there is no residual.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from kvmem.kv.pool import KVPool, block_nbytes
from kvmem.kv.table import BlockTable
from kvmem.model.format import Quantizer, TokenFormat
from kvmem.model.past import Past, SegmentRef, dense_ref, packed_ref

# A block's kind, as ``blocks`` gives it: keys and values in the model's dtype, a block format's
# bytes, or the residual format's bytes (the partly filled last block).
FULL, PACKED, PARTIAL = "f", "q", "r"


class BlockList:
    """Tokens ``[table.start, table.length)`` of one layer (``num_heads`` heads) in ``pool`` blocks.

    Mutators (``append``, ``compact``, ``drop_block``, ``adopt``, ``add_block``, ``release``) keep
    the table, the views and the pool's reference counts in step; ``check`` verifies that.
    """

    def __init__(
        self,
        pool: KVPool,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        fmt: Quantizer | None = None,
        keep: int | None = None,
        device: torch.device | None = None,
        whole: bool = False,
        residual: TokenFormat | None = None,
    ) -> None:
        assert not whole or (fmt is not None and keep is None), "whole blocks: a block format, no window"
        assert residual is None or (fmt is not None and not whole), "a residual format: beside a block format"
        self.whole = whole
        self.pool = pool
        self.num_heads, self.head_dim = num_heads, head_dim
        self.dtype = dtype
        self.device = device if device is not None else torch.device("cpu")
        self.fmt = fmt
        self.layout: Any = None if fmt is None else fmt.layout(num_heads, pool.block_size, head_dim)
        self.residual = residual
        self.residual_layout: Any = (
            None if residual is None else residual.layout(num_heads, pool.block_size, head_dim)
        )
        self.keep = keep  # tokens a later query may still attend to (None: all)
        self.table = BlockTable(pool.block_size)
        # A quantized block has None in `keys` / `values` and its byte buffer in `packed`.
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        self.packed: list[torch.Tensor | None] = []
        self.refs: list[SegmentRef] = []  # where each block lies, for the compiled attention
        # With a residual format, the last block while it is being filled: its bytes, its tokens
        # encoded slot by slot (its ``keys`` / ``values`` / ``packed`` are None, its ref unused).
        self.partial: torch.Tensor | None = None

    @property
    def block_size(self) -> int:
        return self.table.block_size

    @property
    def held(self) -> int:
        return self.table.num_held

    @property
    def length(self) -> int:
        return self.table.length

    @property
    def block_bytes(self) -> int:
        """Bytes of a full-precision block."""
        return block_nbytes(self.num_heads, self.head_dim, self.block_size, self.dtype)

    @property
    def residual_bytes(self) -> int:
        """Bytes of the block being filled: full precision, or the residual format's."""
        return self.block_bytes if self.residual_layout is None else self.residual_layout.nbytes

    @property
    def nbytes(self) -> int:
        size = self.pool.manager.size_of
        return sum(size(b) for b in self.table.block_ids)

    def check(self) -> None:
        self.table.check()
        n = len(self.table.block_ids)
        assert len(self.keys) == len(self.values) == len(self.packed) == len(self.refs) == n
        if self.partial is not None:
            assert n > 0 and self.partial is self.pool.tensor(self.table.block_ids[-1])
            assert self.keys[-1] is None and self.packed[-1] is None
        else:
            assert all(k is not None or p is not None for k, p in zip(self.keys, self.packed))

    # --- writing
    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new tokens after the held ones: k, v [H, q, D]."""
        table, bs = self.table, self.block_size
        plan = table.plan_append(k.shape[1], self.keep)
        for _ in range(plan.drop_blocks):
            self.pool.decref(table.block_ids.pop(0))
            del self.keys[0], self.values[0], self.packed[0], self.refs[0]
            table.start += bs
        table.length += plan.skip_tokens
        if not table.block_ids:
            table.start = table.length
            self.partial = None  # the last block, if it was the partial one, is gone
        k, v = k[:, plan.skip_tokens :], v[:, plan.skip_tokens :]
        written, q = 0, k.shape[1]
        if self.fmt is not None:
            written = self._append_quantized(k, v)
        while written < q:
            fill = table.last_fill
            if not table.block_ids or fill == bs:
                if table.block_ids and self.fmt is not None and self.packed[-1] is None:
                    self._quantize_last()
                self._new_block()
                fill = 0
            n = min(bs - fill, q - written)
            self._write_slots(fill, k[:, written : written + n], v[:, written : written + n])
            written += n
            table.length += n

    def _write_slots(self, fill: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v [H, n, D] into slots ``fill…`` of the last block (full precision or partial)."""
        n = k.shape[1]
        if self.partial is not None:
            assert self.residual is not None
            self.residual.write(k, v, self.residual_layout, self.partial, fill)
            return
        last_k, last_v = self.keys[-1], self.values[-1]
        assert last_k is not None and last_v is not None
        last_k[:, fill : fill + n] = k
        last_v[:, fill : fill + n] = v

    def _last_dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The last block's keys and values [H, bs, D], decoded if it is a partial buffer."""
        if self.partial is not None:
            assert self.residual is not None
            return self.residual.read(self.partial, self.residual_layout, self.dtype)
        keys, values = self.keys[-1], self.values[-1]
        assert keys is not None and values is not None
        return keys, values

    @property
    def _residual_open(self) -> bool:
        """Whether the last block is the residual (not yet quantized)."""
        return bool(self.table.block_ids) and self.packed[-1] is None

    def _append_quantized(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """Fill the residual block, then store every input block that is complete and followed by
        more tokens straight in its quantized form, encoded in one call with the residual if that
        is full: no full-precision block is allocated for them. Tokens stored; the rest (fewer
        than a block, at least one) goes to a new residual block."""
        table, bs, q = self.table, self.block_size, k.shape[1]
        written = 0
        residual = self._residual_open
        if residual and table.last_fill < bs:
            fill = table.last_fill
            written = min(bs - fill, q)
            self._write_slots(fill, k[:, :written], v[:, :written])
            table.length += written
        if self.whole:
            assert not residual and q % bs == 0, "a whole-block list receives whole blocks"
            complete = q // bs
        else:
            complete = max(0, (q - written - 1) // bs)  # the input's last token stays in full precision
        full_residual = residual and table.last_fill == bs and q > written
        if complete == 0 and not full_residual:
            return written
        # [N, H, bs, D]: the full residual (if it is to be quantized now), then the complete input blocks
        new_k = k[:, written : written + complete * bs].unflatten(1, (complete, bs)).transpose(0, 1)
        new_v = v[:, written : written + complete * bs].unflatten(1, (complete, bs)).transpose(0, 1)
        if full_residual:
            last_k, last_v = self._last_dense()
            new_k = torch.cat([last_k.unsqueeze(0), new_k])
            new_v = torch.cat([last_v.unsqueeze(0), new_v])
        encoded = torch.empty((new_k.shape[0], self.layout.nbytes), dtype=torch.uint8, device=k.device)
        assert self.fmt is not None
        self.fmt.encode(new_k, new_v, self.layout, encoded)
        ids = []
        try:
            for _ in range(new_k.shape[0]):
                ids.append(self.pool.allocate_raw(self.layout.nbytes, k.device))
        except BaseException:
            for block_id in ids:
                self.pool.decref(block_id)
            raise
        for block_id, data in zip(ids, encoded):
            self.pool.tensor(block_id).copy_(data)
        if full_residual:  # the residual block gives way to its quantized form
            self.pool.decref(table.block_ids[-1])
            table.block_ids[-1] = ids[0]
            packed = self.pool.tensor(ids[0])
            self.keys[-1] = self.values[-1] = self.partial = None
            self.packed[-1] = packed
            self.refs[-1] = packed_ref(packed, bs)
            ids = ids[1:]
        for block_id in ids:
            table.block_ids.append(block_id)
            self._hold(self.pool.tensor(block_id), packed=True)
        table.length += complete * bs
        return written + complete * bs

    def _new_block(self) -> None:
        if self.residual is not None:  # the partial buffer, zeroed: unwritten slots decode to zeros
            block_id = self.pool.allocate_raw(self.residual_layout.nbytes, self.device)
            self.table.block_ids.append(block_id)
            self._hold_partial(self.pool.tensor(block_id).zero_())
            return
        block_id = self.pool.allocate(self.num_heads, self.head_dim, self.dtype, self.device)
        self.table.block_ids.append(block_id)
        self._hold(self.pool.tensor(block_id), packed=False)  # [2, H, bs, D]

    def _hold_partial(self, buffer: torch.Tensor) -> None:
        self.keys.append(None)
        self.values.append(None)
        self.packed.append(None)
        self.refs.append(packed_ref(buffer, self.block_size))  # never read: past() decodes it
        self.partial = buffer

    def _quantize_last(self) -> None:
        """The last block is full: replace it with its quantized form (the residual moves on)."""
        assert self.fmt is not None
        keys, values = self._last_dense()
        block_id = self.pool.allocate_raw(self.layout.nbytes, keys.device)
        packed = self.pool.tensor(block_id)
        self.fmt.encode(keys, values, self.layout, packed)
        self.pool.decref(self.table.block_ids[-1])
        self.table.block_ids[-1] = block_id
        self.keys[-1] = self.values[-1] = self.partial = None
        self.packed[-1] = packed
        self.refs[-1] = packed_ref(packed, self.block_size)

    # --- reading
    def past(self, last: int | None = None) -> Past:
        """The held tokens (only the ``last`` ones if given) as views, for attention."""
        if not self.table.block_ids:
            return Past.empty(self.dtype)
        bs = self.block_size
        skip = 0 if last is None else max(0, self.held - last)
        first, lo = divmod(skip, bs)
        packed = [(i, b) for i, b in enumerate(self.packed[first:]) if b is not None]
        keys, values, refs = self.keys[first:], self.values[first:], self.refs[first:]
        if self.partial is not None:  # decoded for this read: [H, bs, D] each
            last_k, last_v = self._last_dense()
            keys[-1], values[-1], refs[-1] = last_k, last_v, dense_ref(last_k, last_v)
        return Past(keys, values, lo, self.held - skip, self.dtype, packed, self.fmt, self.layout, refs=refs)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the held tokens as new tensors: [H, T, D] each."""
        if not self.table.block_ids:
            empty = torch.empty((self.num_heads, 0, self.head_dim), dtype=self.dtype, device=self.device)
            return empty, empty
        return self.past().dense()

    # --- sizes
    def cost_of_blocks(self, n: int) -> int:
        """Most bytes held with ``n`` blocks: with a block format, all but the last are quantized,
        plus one quantized block while the next full one is being converted."""
        if self.layout is None or n == 0:
            return n * self.block_bytes
        return n * self.layout.nbytes + (0 if self.whole else self.residual_bytes)

    def bytes_to_append(self, q: int) -> tuple[int, int]:
        """(bytes held now, bytes held after appending ``q`` tokens in one forward), counting
        full-precision blocks (an upper bound with a block format)."""
        blocks_after = self.table.plan_append(q, self.keep).blocks_after
        return len(self.table.block_ids) * self.block_bytes, blocks_after * self.block_bytes

    def max_bytes_to_grow(self, n: int) -> int:
        """Most bytes held while ``n`` more tokens arrive, in chunks of any size.

        A window's first block always still holds a token of the window, so a sliding list holds
        at most ``keep + block_size - 1`` tokens, however they came.
        """
        bs = self.block_size
        blocks = -(-(self.held + n) // bs)
        if self.keep is not None:
            blocks = min(blocks, -(-(self.keep + bs - 1) // bs))
        return self.cost_of_blocks(max(blocks, len(self.table.block_ids)))

    # --- eviction
    @torch.inference_mode()
    def compact(
        self,
        keep: torch.Tensor,
        kept_keys: torch.Tensor | None = None,
        kept_values: torch.Tensor | None = None,
    ) -> None:
        """Keep only the slots ``keep`` ([H, k], ascending per head) and free the blocks left over.

        Slot ``j`` of head ``h`` becomes ``keep[h, j]`` (or ``kept_keys[h, j]`` / ``kept_values[h, j]``
        when given, e.g. after merging). The kept tokens move to the front of the list's own
        blocks, so no block is allocated (quantized lists re-store them); emptied blocks are freed.
        """
        assert self.keep is None, "sliding windows are bounded by their window"
        heads, k = keep.shape
        keys, values = self.dense()  # [H, T, D]
        index = keep.unsqueeze(-1).expand(heads, k, self.head_dim)
        kept_k = keys.gather(1, index) if kept_keys is None else kept_keys  # [H, k, D]
        kept_v = values.gather(1, index) if kept_values is None else kept_values
        table, bs = self.table, self.block_size
        if self.fmt is not None:  # re-store the kept tokens (full blocks are quantized again)
            length = table.length
            self.release()
            self.table.start = self.table.length = length - k
            self.append(kept_k, kept_v)
            return
        needed = -(-k // bs)
        for i in range(needed):
            n = min(bs, k - i * bs)
            keys_i, values_i = self.keys[i], self.values[i]
            assert keys_i is not None and values_i is not None
            keys_i[:, :n] = kept_k[:, i * bs : i * bs + n]
            values_i[:, :n] = kept_v[:, i * bs : i * bs + n]
        for block_id in table.block_ids[needed:]:
            self.pool.decref(block_id)
        del table.block_ids[needed:], self.keys[needed:], self.values[needed:], self.packed[needed:]
        del self.refs[needed:]
        table.start = table.length - k  # held tokens stand for the last k of the positions seen

    def drop_block(self, i: int) -> None:
        """Free block ``i``, a full one: its tokens leave the list (the others keep their order)."""
        table, bs = self.table, self.block_size
        assert self.keep is None and (i < len(table.block_ids) - 1 or table.last_fill == bs)
        if i in (-1, len(table.block_ids) - 1):
            self.partial = None
        self.pool.decref(table.block_ids.pop(i))
        del self.keys[i], self.values[i], self.packed[i], self.refs[i]
        table.start += bs

    # --- shared and saved blocks
    def adopt(self, block_ids: list[int], start: int, length: int) -> None:
        """Hold shared full blocks (a cached prefix) as this empty list's tokens ``[start, length)``.

        Each block gets one more reference. They are never written: every block is full, so the
        next token goes to a new block (a quantized block stays quantized).
        """
        assert not self.table.block_ids and (length - start) == len(block_ids) * self.block_size
        for block_id in block_ids:
            self.pool.incref(block_id)
            block = self.pool.tensor(block_id)
            self._hold(block, block.dtype == torch.uint8 and self.fmt is not None)
            self.device = block.device
        self.table.block_ids = list(block_ids)
        self.table.start, self.table.length = start, length

    def _hold(self, block: torch.Tensor, packed: bool) -> None:
        self.keys.append(None if packed else block[0])  # block: [2, H, bs, D] or packed bytes
        self.values.append(None if packed else block[1])
        self.packed.append(block if packed else None)
        self.refs.append(packed_ref(block, self.block_size) if packed else dense_ref(block[0], block[1]))

    def blocks(self) -> list[tuple[torch.Tensor, str]]:
        """Each block's pool tensor in table order, and its kind: ``FULL`` (keys and values,
        [2, H, bs, D]), ``PACKED`` (a block format's uint8 buffer) or ``PARTIAL`` (the residual
        format's buffer). The tensors are the pool's: do not write."""
        kinds = [FULL if p is None else PACKED for p in self.packed]
        if self.partial is not None:
            kinds[-1] = PARTIAL
        return [(self.pool.tensor(b), kind) for b, kind in zip(self.table.block_ids, kinds)]

    def add_block(self, source: torch.Tensor, kind: str) -> None:
        """Append a block holding a copy of ``source`` (as ``blocks`` gives them), allocated in the
        pool (may raise ``KVBudgetError``). The caller sets the table's ``start`` and ``length``
        once every block is in (restoring saved state); only the last block may be ``PARTIAL``."""
        assert self.partial is None, "a partial block is the last one"
        if kind == FULL:
            block_id = self.pool.allocate(self.num_heads, self.head_dim, source.dtype, self.device)
        else:
            block_id = self.pool.allocate_raw(source.numel(), self.device)
        self.table.block_ids.append(block_id)
        block = self.pool.tensor(block_id)
        block.copy_(source)
        if kind == PARTIAL:
            self._hold_partial(block)
        else:
            self._hold(block, kind == PACKED)

    def copy_to(self, pool: KVPool) -> BlockList:
        """An independent copy whose blocks live in ``pool`` (same block size)."""
        new = copy.copy(self)
        new.pool = pool
        new.table = BlockTable(pool.block_size)
        new.keys, new.values, new.packed, new.refs = [], [], [], []
        new.partial = None
        new.layout = copy.copy(self.layout)  # per-layer state (BFP's permutation) is the copy's own
        for source, kind in self.blocks():
            new.add_block(source, kind)
        new.table.start, new.table.length = self.table.start, self.table.length
        return new

    def release(self) -> None:
        """Give every block back to the pool; the list is empty afterwards."""
        for block_id in self.table.block_ids:
            self.pool.decref(block_id)
        self.table = BlockTable(self.pool.block_size)
        self.keys, self.values, self.packed, self.refs = [], [], [], []
        self.partial = None
