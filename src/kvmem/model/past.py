"""What attention reads of one layer of one sequence: its held tokens as views of pool blocks.

A ``Past`` lists a layer's held keys and values in slot order, as views of the pool's block
tensors ([H, n, D] each, no copy), or, for a quantized block, its packed bytes, decoded only when
that layer's attention runs (``decode_packed``, one call for every quantized block of a batch).
Slots ``[lo, lo + count)`` are the tokens new queries may attend to; the slots around them (the
unfilled tail of the last block, the part of a sliding window's first block that fell out of the
window) are masked, never copied out. A per-head layer whose heads hold different counts marks
its padding in ``valid``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvmem.model.format import Quantizer

# Where a part lies, for the compiled attention (``kvmem.model.kernel``): kind (0 full precision,
# 1 a quantized block's buffer), key pointer (or buffer), value pointer, slots, head stride.
SegmentRef = tuple[int, int, int, int, int]
FULL, PACKED = 0, 1


def dense_ref(keys: torch.Tensor, values: torch.Tensor) -> SegmentRef:
    """The ref of keys and values [H, n, D] laid out token-major within each head."""
    d = keys.shape[2]
    assert keys.stride()[1:] == (d, 1) and values.stride() == keys.stride(), "a part needs [H, n, D] rows"
    return (FULL, keys.data_ptr(), values.data_ptr(), keys.shape[1], keys.stride(0))


def packed_ref(buffer: torch.Tensor, block_size: int) -> SegmentRef:
    return (PACKED, buffer.data_ptr(), 0, block_size, 0)


@dataclass
class Past:
    """One layer's held tokens for attention. The lists are the Past's own (filling them is safe);
    the tensors in them are the pool's: never write to them."""

    keys: list[torch.Tensor | None]  # [H, n_i, D] per part; None where ``packed`` holds the part
    values: list[torch.Tensor | None]
    lo: int  # first slot a query may attend to
    count: int  # slots from ``lo`` on that hold tokens
    dtype: torch.dtype
    packed: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (part index, uint8 [nbytes])
    fmt: Quantizer | None = None  # decodes ``packed``
    layout: Any = None
    valid: torch.Tensor | None = None  # [H, lo + count] bool, False on a head's padding; None: all valid
    refs: list[SegmentRef] = field(default_factory=list)  # one per part

    @classmethod
    def empty(cls, dtype: torch.dtype) -> Past:
        return cls([], [], 0, 0, dtype)

    @property
    def slots(self) -> int:
        """Slots the parts span: what the layer's row of a batch takes before its new tokens."""
        size = 0 if self.layout is None else self.layout.block_size
        return sum(size if k is None else k.shape[1] for k in self.keys)

    def prepend(self, keys: torch.Tensor, values: torch.Tensor) -> Past:
        """The same past with ``keys``/``values`` ([H, n, D], all attended) in front; only for a
        past whose valid slots start at 0 (full-attention layers)."""
        assert self.lo == 0 and self.valid is None
        n = keys.shape[1]
        packed = [(i + 1, buffer) for i, buffer in self.packed]
        return Past(
            [keys, *self.keys],
            [values, *self.values],
            0,
            self.count + n,
            self.dtype,
            packed,
            self.fmt,
            self.layout,
            refs=[dense_ref(keys, values), *self.refs],
        )

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid slots as new tensors: keys, values [H, count, D] (a copy; scorers, the plain path)."""
        decode_packed([self])
        if not self.keys:
            raise ValueError("an empty past has no shape; check count first")
        keys = torch.cat(self.keys, dim=1)[:, self.lo : self.lo + self.count]  # type: ignore[arg-type]
        values = torch.cat(self.values, dim=1)[:, self.lo : self.lo + self.count]  # type: ignore[arg-type]
        return keys, values


def decode_packed(pasts: Sequence[Past]) -> None:
    """Fill every quantized part of ``pasts`` with its decoded keys and values, one decode call per
    block format and layout. The decoded tensors live until the caller drops the pasts."""
    groups: dict[tuple[int, Hashable], list[tuple[Past, int, torch.Tensor]]] = {}
    for past in pasts:
        for index, buffer in past.packed:
            groups.setdefault((id(past.fmt), past.layout), []).append((past, index, buffer))
        past.packed = []
    for entries in groups.values():
        first = entries[0][0]
        assert first.fmt is not None
        stacked = torch.stack([buffer for _, _, buffer in entries])  # [N, nbytes]
        keys, values = first.fmt.decode(stacked, first.layout, first.dtype)  # [N, H, bs, D] each
        for (past, index, _), k, v in zip(entries, keys.contiguous().unbind(0), values.unbind(0)):
            past.keys[index], past.values[index] = k, v
