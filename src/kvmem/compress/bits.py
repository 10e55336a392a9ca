"""Bits per element: the unit low-bit KV formats are compared in, every byte of metadata included.

An element is one scalar of a key or a value (``2 * heads * tokens * head_dim`` per layer).
A format's full block costs ``layout.nbytes * 8 / (2 * H * bs * D)`` bits per element: codes,
scales, zero points, means, exponents and permutations all count. A whole cache's figure (the
bench's ``bits/el``) also counts the last block of each layer, the one being filled: in the
model's dtype, or in a residual format (``res8``: 8.25 bits per element at SmolLM2's geometry).
"""

from __future__ import annotations

from typing import Protocol

from kvmem.model.format import Layout


class Format(Protocol):
    """A block format (``Quantizer``) or a residual one (``TokenFormat``): what bits are read from."""

    @property
    def bits(self) -> float: ...

    def layout(self, heads: int, block_size: int, head_dim: int) -> Layout: ...


REFERENCE_GEOMETRY = (3, 64, 64)  # SmolLM2-135M: 3 KV heads, head_dim 64, kvmem's 64-token blocks


def block_bits(quantizer: Format, heads: int, block_size: int, head_dim: int) -> float:
    """Bits per element of one full block in ``quantizer``'s format, metadata included."""
    layout = quantizer.layout(heads, block_size, head_dim)
    return layout.nbytes * 8 / (2 * heads * block_size * head_dim)


def describe_bits(quantizer: Format) -> str:
    """``"nominal 3.0 bits, 3.38 bits/element with metadata"`` at the reference geometry."""
    heads, head_dim, block_size = REFERENCE_GEOMETRY
    measured = block_bits(quantizer, heads, block_size, head_dim)
    return f"nominal {float(quantizer.bits):g} bits, {measured:.2f} bits/element with metadata"
