"""Every block format by name: the quantizers of full blocks and the residual formats.

A new format is one file (its ``Quantizer``, and a ``Layout`` subclass whose hooks say what else it
knows: per-layer state, a compiled kernel's geometry) plus its line here and its KL bound
(``tests/compress/test_kl_gates.py``); policies (``quant``, ``sliding-``, ``mixed-``), snapshots,
the kernel and the vLLM connector find it from here.
"""

from __future__ import annotations

from kvmem.compress.bfp import BlockFloat
from kvmem.compress.kivi import KIVI
from kvmem.compress.part import UnknownPolicyError
from kvmem.compress.residual import RotatedTokens
from kvmem.compress.rotated import RotatedQuant, parse_rotated
from kvmem.model.format import Quantizer

QUANTIZERS: dict[str, Quantizer] = {
    q.name: q
    for q in (
        KIVI(2),
        KIVI(4),
        KIVI(8),
        BlockFloat(4),
        BlockFloat(8),
        RotatedQuant(4, 4),
        RotatedQuant(3, 3),
        RotatedQuant(4, 2),
        RotatedQuant(3, 2),
        RotatedQuant(2, 2),
        RotatedQuant(3, 3, "uniform"),
    )
}
"""The quantizers listed by ``kvmem policies``; any ``rot…`` width pair is accepted (``find_quantizer``)."""


RESIDUALS = {r.name: r for r in (RotatedTokens(8), RotatedTokens(4))}
"""The residual formats listed by ``kvmem policies``; ``res4`` … ``res8`` are accepted."""


def find_quantizer(name: str) -> Quantizer | None:
    """A registered quantizer, or a rotated one of any widths (``rotk4v3``, ``rotu2``); else None."""
    return QUANTIZERS.get(name) or parse_rotated(name)


def prefixed_format(word: str, prefix: str, examples: str) -> Quantizer | None:
    """The format ``<prefix>-<format>`` names (``sliding-rot2``); None if ``word`` is not so prefixed.
    Raises ``UnknownPolicyError`` if what follows names no format."""
    if not word.startswith(prefix + "-"):
        return None
    fmt = find_quantizer(word.removeprefix(prefix + "-"))
    if fmt is None:
        raise UnknownPolicyError(f"{word!r} names no block format ({examples})")
    return fmt
