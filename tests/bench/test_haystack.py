from __future__ import annotations

import re

import pytest

from kvmem.bench.haystack import Needle, filler, filler_sentences, insert_needles, spread


def test_filler_is_plain_prose_without_digits_or_capitals_runs() -> None:
    sentences = filler_sentences()
    assert len(sentences) > 500
    assert len(set(sentences)) == len(sentences)
    for s in sentences:
        assert not re.search(r"[0-9]|[A-Z]{3}", s)
        assert s.endswith(".") and 5 <= len(s.split()) <= 60


def test_filler_wraps_around() -> None:
    n = len(filler_sentences())
    assert filler(n - 1, 3) == [filler_sentences()[-1], *filler_sentences()[:2]]


def test_needles_land_at_their_offsets_and_depths() -> None:
    sentences = filler(0, 200)
    needles = [Needle(d, f"NEEDLE{i}.") for i, d in enumerate((0.0, 0.3, 0.3, 0.77, 1.0))]
    hay = insert_needles(sentences, needles)
    filler_chars = len(hay.text) - sum(len(n.text) + 1 for n in needles)
    for needle, offset in zip(needles, hay.offsets):
        assert hay.text[offset:].startswith(needle.text)
        assert hay.text.count(needle.text) == 1
        needles_before = sum(len(n.text) + 1 for n, o in zip(needles, hay.offsets) if o < offset)
        before = offset - needles_before
        assert abs(before / filler_chars - needle.depth) < 0.01
    assert hay.offsets[1] < hay.offsets[2]  # same boundary: order kept
    assert hay.text.startswith("NEEDLE0.") and hay.text.endswith("NEEDLE4.")


def test_needle_depth_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="depth"):
        insert_needles(filler(0, 3), [Needle(1.5, "x")])


def test_spread_starts_at_depth_and_covers_the_interval() -> None:
    assert spread(0.25, 4) == (0.25, 0.5, 0.75, 0.0)
    assert spread(1.0, 2) == (1.0, 0.5)
    assert spread(0.3, 1) == (0.3,)
