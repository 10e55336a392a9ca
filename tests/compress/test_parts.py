"""A policy part is one class plus its registry line: a toy part, registered here only, just works."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from kvmem.compress.budget import KVBudget
from kvmem.compress.part import Part
from kvmem.compress.registry import PARTS, UnknownPolicyError, make_policy
from kvmem.prefix.cache import can_share


@dataclass(frozen=True)
class Gate(Part):
    name = "gate"
    summary = "a toy part: needs an eviction method, goes without merging"
    slot = "gate"
    shares_prefix = False
    needs = ("scorer",)
    excludes = ("merge",)


TOY = (*PARTS, Gate)


def test_a_toy_part_parses_names_and_checks_without_other_edits() -> None:
    budget = KVBudget.parse("1MiB")
    policy = make_policy("gate+snapkv+kivi4", budget, TOY)
    assert policy.name == "snapkv+kivi4+gate" and make_policy(policy.name, budget, TOY) == policy
    assert policy.evicts and not policy.shares_prefix and not can_share(policy)
    assert can_share(make_policy("kivi4", budget, TOY))
    with pytest.raises(UnknownPolicyError, match="gate needs an eviction method"):
        make_policy("gate+kivi4", budget, TOY)
    with pytest.raises(UnknownPolicyError, match="gate cannot be combined with merging"):
        make_policy("snapkv+merge+gate", budget, TOY)
    with pytest.raises(UnknownPolicyError, match="at most one"):
        make_policy("snapkv+gate+gate", budget, TOY)
    with pytest.raises(UnknownPolicyError, match="unknown policy 'gate'"):
        make_policy("snapkv+gate", budget)  # not registered in the real registry


def test_every_registered_part_fills_a_slot_and_lists_its_words() -> None:
    for kind in PARTS:
        assert isinstance(kind.slot, str)
        for word, summary in kind.rows():
            assert summary
            if "<" not in word:
                assert kind.parse(word) is not None, word
