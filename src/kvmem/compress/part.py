"""The contract of a policy part: one ``+``-joined word of a policy name (``snapkv``, ``kivi4``, ``adakv``).

A part fills one slot of a ``Policy`` (at most one part a slot) and says, as class attributes,
what the policy needs to know of it: whether it evicts, whether it keeps a sequence within a
byte budget, whether blocks made under it can be shared as a prefix, which slots it needs filled
and which it cannot go with. ``check`` holds any further rule (a budget it needs); ``layer_spec``
what it makes of a full-attention layer. A part is a frozen dataclass in a file of its own,
listed once in ``kvmem.compress.registry.PARTS``: parsing, the compatibility rules, ``kvmem
policies``, prefix sharing and the engine all read it from there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from kvmem.errors import KVMemError
from kvmem.model.format import Quantizer, TokenFormat
from kvmem.model.layers import LayerSpec

if TYPE_CHECKING:
    from kvmem.compress.policy import Policy

# how messages name a slot; a slot missing here is named as it is
NOUNS = {
    "scorer": "an eviction method",
    "allocator": "a layer allocation",
    "heads": "a head allocation (adakv)",
    "merge": "merging",
    "mixed": "mixed precision",
    "quant": "a block format",
    "sliding": "a format for sliding layers",
    "residual": "a residual format",
}


class UnknownPolicyError(KVMemError, ValueError):
    """The policy name is not registered, or its parts cannot go together."""


def nouns(slots: tuple[str, ...] | list[str], joiner: str) -> str:
    return f" {joiner} ".join(NOUNS.get(slot, slot) for slot in slots)


class Part:
    """One part of a policy. Reads nothing but the policy it is checked against; never mutates.

    ``parse`` makes the part a word names (None: not this kind's word); ``rows`` lists the kind's
    words for ``kvmem policies``. ``check`` raises ``UnknownPolicyError`` or ``InvalidBudgetError``.
    """

    name: ClassVar[str]  # a property in parts named by their options (``mixed-rot2``)
    summary: ClassVar[str]
    slot: ClassVar[str]
    evicts: ClassVar[bool] = False  # drops tokens: a layer's capacity applies
    bounds: ClassVar[bool] = False  # keeps a sequence within a byte budget (evicting, offloading)
    shares_prefix: ClassVar[bool] = True  # its blocks hold exactly the prefix's tokens
    implied: ClassVar[bool] = False  # the same as leaving its slot empty (``uniform``)
    needs: ClassVar[tuple[str, ...]] = ()  # at least one of these slots filled
    excludes: ClassVar[tuple[str, ...]] = ()  # none of these slots filled

    @classmethod
    def parse(cls, word: str) -> Part | None:
        return cls() if word == cls.name else None

    @classmethod
    def rows(cls) -> list[tuple[str, str]]:
        return [(cls.name, cls.summary)]

    def unmet(self) -> str:
        """Why this part needs another (``needs``)."""
        return f"{self.name} needs {nouns(self.needs, 'or')} to apply"

    def excluded(self, slots: list[str]) -> str:
        """Why this part cannot go with the parts in ``slots`` (``excludes``)."""
        return f"{self.name} cannot be combined with {nouns(slots, 'or')}"

    def check(self, policy: Policy) -> None:
        """Rules beyond ``needs`` and ``excludes`` (the scorer's kind, the budget's unit)."""

    def layer_spec(self, fmt: Quantizer | None, residual: TokenFormat | None) -> LayerSpec | None:
        """The kind a full-attention layer takes under this part; None: it leaves the layer paged."""
        return None
