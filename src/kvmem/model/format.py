"""The block-format contract (``Quantizer``): how a layer stores a full block of keys and values in bytes.

A quantizer turns one full block (keys, values: [H, bs, D]) into one ``uint8`` buffer of exactly
``layout.nbytes`` bytes, so the pool counts the real bytes held, and back. A layer's block list
calls ``layout`` once and passes that same object to every ``encode`` and ``decode`` of the layer.

The contract lives here, on the storage floor; the formats themselves (KIVI, BFP) are
compression methods in ``kvmem.compress`` and are handed to the layers by a policy.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

import torch


class Layout(Protocol):
    """Where each part of a quantized block sits in its byte buffer."""

    @property
    def nbytes(self) -> int:
        """Bytes of one quantized block, everything included."""
        ...


L = TypeVar("L", bound=Layout)


class Quantizer(Protocol[L]):
    """A block format (KIVI, BFP, …). ``L`` is its layout type; a bare ``Quantizer`` means any.

    ``encode`` writes ``out`` (uint8 [..., layout.nbytes]) for full blocks (keys, values
    [..., H, bs, D]: any leading dimensions, each block encoded on its own) and may record
    per-layer state on the layout (BFP's channel permutation); it never keeps a reference to
    ``keys`` or ``values``.
    ``decode`` reads only the buffer and the layout's geometry, so a block decodes on its own; it
    takes any leading dimensions (uint8 [..., nbytes] -> keys, values [..., H, bs, D]), so a layer
    decodes all of its quantized blocks in one call rather than one call per block.
    """

    @property
    def name(self) -> str: ...  # registry name, e.g. "kivi4"

    @property
    def bits(self) -> float: ...  # nominal bits of each element's code (the mean of keys and values)

    @property
    def summary(self) -> str: ...  # one line for `kvmem policies`

    def layout(self, heads: int, block_size: int, head_dim: int) -> L: ...

    def encode(self, keys: torch.Tensor, values: torch.Tensor, layout: L, out: torch.Tensor) -> None: ...

    def decode(
        self, buffer: torch.Tensor, layout: L, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def write_parts(out: torch.Tensor, nbytes: int, parts: list[torch.Tensor]) -> None:
    """Lay ``parts`` (each [N, ...] of any dtype, N blocks) side by side into ``out`` (uint8
    [..., nbytes], N rows): block ``i``'s bytes of every part, in order, fill row ``i`` exactly."""
    rows = out.reshape(-1, nbytes)  # [N, nbytes]
    offset = 0
    for part in parts:
        raw = part.contiguous().view(torch.uint8).reshape(rows.shape[0], -1)  # its bytes, per block
        rows[:, offset : offset + raw.shape[1]] = raw
        offset += raw.shape[1]
    if offset != nbytes:
        raise ValueError(f"the parts hold {offset} bytes per block, the layout {nbytes}")
