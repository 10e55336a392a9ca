"""The block-format contracts (``Quantizer``, ``TokenFormat``): how a layer stores keys and values in bytes.

A quantizer turns one full block (keys, values: [H, bs, D]) into one ``uint8`` buffer of exactly
``layout.nbytes`` bytes, so the pool counts the real bytes held, and back. A layer's block list
calls ``layout`` once and passes that same object to every ``encode`` and ``decode`` of the layer.

A ``TokenFormat`` holds the block still being filled (the residual, full precision otherwise):
it encodes tokens slot by slot as they arrive, so the residual costs its bits too.

The contracts live here, on the storage floor; the formats themselves (KIVI, BFP, rotated) are
compression methods in ``kvmem.compress`` and are handed to the layers by a policy.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

import torch


class Layout(Protocol):
    """Where each part of a quantized block sits in its byte buffer, and what else a format knows
    of a layer's blocks. A format's layout subclasses ``Layout`` to inherit the hooks' defaults
    (no state, no compiled kernel), so that snapshots, the kernel and the vLLM connector ask the
    layout rather than knowing formats by name."""

    @property
    def nbytes(self) -> int:
        """Bytes of one quantized block, everything included."""
        ...

    @property
    def kernel_geometry(self) -> tuple[int, ...] | None:
        """What kvmem's compiled attention (``kvmem.model.kernel``) needs to read this layout's
        blocks in place; None where it cannot (attention then decodes them first)."""
        return None

    @property
    def layer_state(self) -> bool:
        """Whether ``encode`` records per-layer state on the layout (BFP's channel permutation):
        one layout then serves one layer, and a snapshot keeps ``state()``."""
        return False

    def state(self) -> dict[str, torch.Tensor]:
        """The per-layer state recorded so far, by name (empty for most formats). Read only."""
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Set state that ``state()`` returned (tensors on the layer's device). Raises
        ``ValueError`` for a name this layout does not hold."""
        if state:
            raise ValueError(f"this block format keeps no per-layer state, got {sorted(state)}")


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


class TokenFormat(Protocol[L]):
    """A format for the block still being filled (a block list's residual): tokens are encoded
    one slot at a time, so a partial block is held in it from its first token. ``L`` is its
    layout type, with the same ``nbytes`` meaning as a block format's.

    ``write`` encodes keys, values ([H, n, D]) into slots ``[start, start + n)`` of ``out`` (uint8
    [layout.nbytes]) and touches no other slot; it keeps no reference to its inputs.
    ``read`` decodes every slot of ``buffer`` (uint8 [nbytes]) into keys, values [H, bs, D] in
    ``dtype``; slots never written decode to zeros, if the buffer was zeroed.
    """

    @property
    def name(self) -> str: ...  # registry name, e.g. "res8"

    @property
    def bits(self) -> float: ...  # nominal bits of each element's code

    @property
    def summary(self) -> str: ...

    def layout(self, heads: int, block_size: int, head_dim: int) -> L: ...

    def write(
        self, keys: torch.Tensor, values: torch.Tensor, layout: L, out: torch.Tensor, start: int
    ) -> None: ...

    def read(
        self, buffer: torch.Tensor, layout: L, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]: ...
