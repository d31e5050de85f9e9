"""Sanitize stage and the segmenter: table-driven cases and chunking-invariance properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.output.sanitize import LiteralRemover, Sanitizer
from engine.output.segments import Segmenter
from engine.output.types import OutputRequest


def sanitize_all(
    text: str, request: OutputRequest = OutputRequest(), **options
) -> tuple[str, bool]:
    f = Sanitizer(**options).open(request)
    out = f.feed(text)
    return out + f.flush(), f.stopped


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Hello</s>", "Hello"),
        ("<s>[INST] leaked [/INST] answer", " leaked  answer"),
        ("<<SYS>>\nsys\n<</SYS>>\n\nhi", "\nsys\n\n\nhi"),
        ("<<s>>", "<>"),  # one pass, leftmost-longest: the inner <s> goes, the rest stays
        ("a\x00b\x07c\x1bd\x7fe\x85f", "abcdef"),
        ("line\r\nnext\ttab", "line\nnext\ttab"),
        ("bi\u202edi\u2066x\u200bz\ufeff", "bidixz"),
        ("emoji 👩\u200d💻 keeps ZWJ", "emoji 👩\u200d💻 keeps ZWJ"),
        ("bad \ufffd byte", "bad  byte"),
        ("lone \ud800 surrogate", "lone  surrogate"),
        ("[INSTEAD] is not a tag", "[INSTEAD] is not a tag"),
        ("", ""),
    ],
)
def test_cleanup(raw, expected):
    assert sanitize_all(raw) == (expected, False)


def test_replacement_char_can_be_kept_and_cleanup_disabled():
    assert sanitize_all("a\ufffdb", remove_replacement_char=False)[0] == "a\ufffdb"
    assert sanitize_all("a\x00b", remove_unsafe_chars=False)[0] == "a\x00b"


@pytest.mark.parametrize(
    ("raw", "stops", "expected", "stopped"),
    [
        ("The answer. ###\nmore", ("###",), "The answer. ", True),
        ("no stop here #", ("###",), "no stop here #", False),
        ("User: hi", ("\nUser:", "User:"), "", True),
        ("a<s>STOPb", ("STOP",), "a", True),  # the stop is found in the raw text
    ],
)
def test_stop_sequences(raw, stops, expected, stopped):
    assert sanitize_all(raw, OutputRequest(stop=stops)) == (expected, stopped)


def test_configured_stop_sequences_apply_to_every_request():
    assert sanitize_all("x\nObservation: y", stop_sequences=("\nObservation:",)) == ("x", True)


def test_max_chars_cuts_and_flags():
    f = Sanitizer(max_chars=5).open(OutputRequest())
    assert f.feed("abc") == "abc" and not f.cut
    assert f.feed("de") == "de" and not f.cut  # exactly at the limit is not a cut
    assert f.feed("f") == "" and f.cut
    assert f.feed("more") == "" and f.flush() == ""


@pytest.mark.parametrize(
    ("reason", "tokens", "max_tokens", "want_reason", "problems"),
    [
        (None, 16, 16, "length", 0),
        ("stop", 16, 16, "stop", 0),  # ended by a stop at the last token
        ("length", 17, 16, "length", 1),  # the engine overran max_tokens
        (None, 3, 16, None, 0),
        (None, 3, None, None, 0),
    ],
)
def test_verify_length(reason, tokens, max_tokens, want_reason, problems):
    got, found = Sanitizer.verify_length(reason, tokens, OutputRequest(max_tokens=max_tokens))
    assert got == want_reason and len(found) == problems


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]


alphabet = st.sampled_from(
    ["<", "s", ">", "/", "[", "INST", "]", "<<", "SYS", ">>", "x", " ", "\x00", "#", "\ufffd"]
)


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(alphabet, max_size=30),
    cuts=st.lists(st.integers(0, 200), max_size=12),
    stop=st.sampled_from([(), ("##",), ("x#", "#<s")]),
)
def test_sanitizer_is_independent_of_chunking(parts, cuts, stop):
    text = "".join(parts)
    whole = sanitize_all(text, OutputRequest(stop=stop))
    f = Sanitizer().open(OutputRequest(stop=stop))
    pieces = [f.feed(p) for p in split(text, cuts)]
    assert ("".join(pieces) + f.flush(), f.stopped) == whole


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab<>/", max_size=40),
    cuts=st.lists(st.integers(0, 100), max_size=10),
    patterns=st.lists(st.text(alphabet="ab<>/", min_size=1, max_size=4), min_size=1, max_size=4),
)
def test_literal_remover_equals_one_pass_over_the_whole(text, cuts, patterns):
    import re

    ordered = sorted(set(patterns), key=len, reverse=True)
    expected = re.sub("|".join(map(re.escape, ordered)), "", text)
    remover = LiteralRemover(patterns)
    assert "".join(remover.feed(p) for p in split(text, cuts)) + remover.flush() == expected


@pytest.mark.parametrize(
    ("text", "segments"),
    [
        ("One. Two! Three? Four", ["One. ", "Two! ", "Three? ", "Four"]),
        ('He said "stop." Then left.', ['He said "stop." ', "Then left."]),
        ("a\n\nb\n", ["a\n", "\n", "b\n"]),
        ("Pi is 3.14 roughly.  Next", ["Pi is 3.14 roughly.  ", "Next"]),
        ("End.  \nNew line", ["End.  \n", "New line"]),
    ],
)
def test_segment_boundaries(text, segments):
    s = Segmenter()
    assert s.feed(text) + s.flush() == segments


def test_long_segments_are_cut_at_a_space_but_not_inside_a_number():
    s = Segmenter(max_chars=10, hard_max_chars=30)
    got = s.feed("aaaa bbbbbb 4111 1111 1111 1111 cc " + "z" * 70) + s.flush()
    # a space after 10 characters ends a segment, but not the spaces between digit groups;
    # a run without spaces is cut at 30 characters
    assert got == ["aaaa bbbbbb ", "4111 1111 1111 1111 ", "cc " + "z" * 27, "z" * 30, "z" * 13]


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet='ab .!?\n"19 \t', max_size=80),
    cuts=st.lists(st.integers(0, 200), max_size=15),
    max_chars=st.integers(1, 12),
)
def test_segmenter_is_independent_of_chunking(text, cuts, max_chars):
    whole = Segmenter(max_chars, 20)
    expected = whole.feed(text) + whole.flush()
    chunked = Segmenter(max_chars, 20)
    got = [seg for piece in split(text, cuts) for seg in chunked.feed(piece)] + chunked.flush()
    assert got == expected and "".join(got) == text
