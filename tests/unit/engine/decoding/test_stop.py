"""Stop strings on a streamed text (OpenAI semantics: the output ends before the stop)."""

from __future__ import annotations

import random

import pytest

from cluster.errors import InvalidRequestError
from engine.decoding.stop import StopStringMatcher


def stream(stops: list[str], deltas: list[str]) -> tuple[list[str], bool, str]:
    """Feed every delta (until a stop); returns the emitted pieces, stopped, flushed text."""
    matcher = StopStringMatcher(stops)
    pieces = []
    for delta in deltas:
        text, stopped = matcher.feed(delta)
        pieces.append(text)
        if stopped:
            return pieces, True, matcher.flush()
    return pieces, False, matcher.flush()


def expected_output(stops: list[str], text: str) -> tuple[str, bool]:
    """Reference: cut before the first stop string to complete (the longest if several)."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            return text[: end - max(map(len, hits))], True
    return text, False


def longest_partial(stops: list[str], text: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    return max(
        (
            n
            for n in range(1, len(text) + 1)
            for s in stops
            if len(s) > n and s.startswith(text[-n:])
        ),
        default=0,
    )


def test_stop_split_across_deltas_is_caught_and_never_sent():
    pieces, stopped, rest = stream(["###"], ["abc#", "#", "#def"])
    assert pieces == ["abc", "", ""] and stopped and rest == ""


def test_held_back_text_is_released_when_it_turns_out_not_to_stop():
    matcher = StopStringMatcher(["###"])
    assert matcher.feed("a##") == ("a", False)
    assert matcher.held_back == "##"
    assert matcher.feed("b") == ("##b", False)
    assert matcher.feed("#") == ("", False)
    assert matcher.flush() == "#"


def test_overlapping_candidates():
    # "aab" inside "aaab": the held "aa" shifts by one character, then the stop completes.
    assert stream(["aab"], list("aaab"))[:2] == (["", "", "a", ""], True)
    assert stream(["abab"], ["xab", "abab"])[:2] == (["x", ""], True)  # "xabab" already stops
    assert stream(["abab"], ["xab", "aab"])[:2] == (["x", "aba"], False)


def test_several_stop_strings_first_to_complete_wins():
    assert stream(["STOP", "END"], ["xxEN", "xSTO", "P tail"])[:2] == (["xx", "ENx", ""], True)
    assert stream(["abcd", "bc"], ["abcd"])[0] == ["a"]  # "bc" completes first
    assert stream(["abc", "bc"], ["xa", "bc"])[0] == ["x", ""]  # same end: cut before the longest
    matcher = StopStringMatcher(["<|end|>", "\n\n"])
    assert matcher.feed("hi\n") == ("hi", False)  # "\n" may start "\n\n"
    assert matcher.feed("\nmore") == ("", True) and matcher.matched == "\n\n"


def test_no_stop_concatenation_equals_input():
    text = "The quick brown fox jumps over the lazy dog. " * 3
    rng = random.Random(0)
    cuts = sorted(rng.sample(range(1, len(text)), 20))
    deltas = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)], strict=True)]
    pieces, stopped, rest = stream(["dogs", "zz", "quick brown cat"], deltas)
    assert not stopped and "".join(pieces) + rest == text
    assert stream([], deltas)[0] == deltas  # no stop strings: everything passes at once


def test_unicode():
    pieces, stopped, _ = stream(["🛑", "。終"], list("你好。世界🛑再见"))
    assert stopped and "".join(pieces) == "你好。世界"
    pieces, stopped, rest = stream(["。終"], ["你好。", "世界"])
    assert not stopped and pieces == ["你好", "。世界"] and rest == ""


def test_after_a_stop_nothing_more_is_emitted():
    matcher = StopStringMatcher(["x"])
    assert matcher.feed("abxcd") == ("ab", True)
    assert matcher.feed("more") == ("", True) and matcher.flush() == ""


def test_empty_stop_string_is_refused():
    with pytest.raises(InvalidRequestError):
        StopStringMatcher(["ok", ""])


@pytest.mark.parametrize("seed", range(5))
def test_random_streams_match_the_reference(seed):
    rng = random.Random(seed)
    for _ in range(300):
        stops = [
            "".join(rng.choices("abc", k=rng.randrange(1, 5))) for _ in range(rng.randrange(1, 4))
        ]
        text = "".join(rng.choices("abcd", k=rng.randrange(0, 30)))
        want, want_stopped = expected_output(stops, text)
        matcher = StopStringMatcher(stops)
        sent, pos, stopped = "", 0, False
        while pos < len(text) and not stopped:
            step = rng.randrange(1, 5)
            piece, stopped = matcher.feed(text[pos : pos + step])
            pos += step
            sent += piece
            assert want.startswith(sent)  # never sends anything past the cut
            if not stopped:  # holds back exactly the text that could still start a stop
                assert sent + matcher.held_back == text[:pos]
                assert len(matcher.held_back) == longest_partial(stops, text[:pos])
        sent += matcher.flush()
        assert (sent, stopped) == (want, want_stopped), (stops, text)
