"""Narrator segmentation (AllTalk's *narration* / "speech" convention)."""

from __future__ import annotations

import dataclasses

import pytest

from lowvox.errors import InvalidRequest
from lowvox.text import Segment, segment_narrator

N, C = "narrator", "character"


def _pairs(text: str, mode: str) -> list[tuple[str, str]]:
    return [(s.role, s.text) for s in segment_narrator(text, mode)]


def test_narration_speech_and_outside_text_in_order():
    text = '*She opens the door.* "Who is there?" Nobody answers. *Silence.*'
    assert _pairs(text, "narrator") == [
        (N, "She opens the door."),
        (C, "Who is there?"),
        (N, "Nobody answers. Silence."),  # outside text is the narrator's: joined
    ]
    assert _pairs(text, "character") == [
        (N, "She opens the door."),
        (C, "Who is there? Nobody answers."),
        (N, "Silence."),
    ]
    assert _pairs(text, "silent") == [
        (N, "She opens the door."),
        (C, "Who is there?"),
        (N, "Silence."),
    ]


def test_quote_inside_narration_is_speech():
    assert _pairs('*She said "hi" and left.*', "silent") == [
        (N, "She said"),
        (C, "hi"),
        (N, "and left."),
    ]


def test_curly_quotes_count_as_speech():
    assert _pairs("“Run!” *He ran.*", "silent") == [(C, "Run!"), (N, "He ran.")]


@pytest.mark.parametrize(
    ("text", "mode", "expected"),
    [
        ('"unclosed quote', "narrator", [(N, "unclosed quote")]),
        ("*unclosed star", "character", [(C, "unclosed star")]),
        ("*a* *b", "silent", [(N, "a")]),
        ('"a" "b', "silent", [(C, "a")]),
        ("**", "narrator", []),
        ('""', "character", []),
        ("* ... *", "narrator", []),  # narration with nothing to say
        ('"!?" ok', "silent", []),  # a punctuation-only fragment is dropped
        ("", "character", []),
        ("😀 *🎉*", "character", []),
        ("x\x00y *z\x07*", "character", [(C, "x\x00y"), (N, "z\x07")]),
    ],
)
def test_malformed_and_empty_input(text, mode, expected):
    assert _pairs(text, mode) == expected


def test_segments_are_frozen_and_roles_valid():
    segs = segment_narrator('*a* "b" c', "character")
    assert all(isinstance(s, Segment) and s.role in (N, C) for s in segs)
    with pytest.raises(dataclasses.FrozenInstanceError):
        segs[0].text = "changed"  # type: ignore[misc]


def test_bad_mode():
    with pytest.raises(InvalidRequest):
        segment_narrator("text", "both")


def test_html_escaped_quotes_are_quotes():
    # text-generation-webui's AllTalk extension posts the chat's HTML, quotes as &quot;
    # (with narrator on and text outside quotes for the narrator); AllTalk unescapes
    # before it segments, so the speech in quotes is the character's.
    text = "&quot;Hello there.&quot; She smiled. *waves* &ldquo;Bye!&rdquo; Tom&#x27;s &amp; co"
    segments = segment_narrator(text, "narrator")
    assert [(s.role, s.text) for s in segments] == [
        ("character", "Hello there."),
        ("narrator", "She smiled. waves"),
        ("character", "Bye!"),
        # Other entities are left for the text filter, which unescapes them once.
        ("narrator", "Tom&#x27;s &amp; co"),
    ]
    assert segment_narrator("&QUOT;Hi&#34; &#X22;yo&quot;", "narrator") == [
        Segment("Hi yo", "character")
    ]
