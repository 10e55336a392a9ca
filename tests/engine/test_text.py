from kvmem.engine.text import StopMatcher


class CharTokenizer:
    """Token i is chr(i)."""

    def decode(self, ids: list[int], **_: object) -> str:
        return "".join(map(chr, ids))


def feed(matcher: StopMatcher, text: str) -> list[str]:
    pieces = []
    for ch in text:
        pieces.append(matcher.push(ord(ch)))
        if matcher.stopped:
            break
    pieces.append(matcher.flush())
    return pieces


def test_without_stop_every_piece_comes_at_once() -> None:
    matcher = StopMatcher(CharTokenizer(), ())
    assert feed(matcher, "abc") == ["a", "b", "c", ""]


def test_stop_text_is_held_back_and_cut() -> None:
    matcher = StopMatcher(CharTokenizer(), ["\nUser:"])
    pieces = feed(matcher, "Hi!\nUser: more")
    assert "".join(pieces) == "Hi!" == matcher.text
    assert matcher.stopped


def test_a_near_miss_is_released() -> None:
    matcher = StopMatcher(CharTokenizer(), ["STOP"])
    assert "".join(feed(matcher, "STOx and more")) == "STOx and more"
    assert not matcher.stopped
