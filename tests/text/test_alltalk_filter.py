"""AllTalk's standard filter (issue 14, item 12): markup goes, speech stays.

SillyTavern's AllTalk provider turns on "pass asterisks", so chat markup reaches the
server; AllTalk's `standard` filter removes it before speaking, and so does lowvox's.
"""

from __future__ import annotations

import pytest

from lowvox.text import filter_text


@pytest.mark.parametrize(
    ("text", "spoken"),
    [
        ("*smiles warmly* Hello!", "smiles warmly Hello!"),
        ("**bold** and ***both***", "bold and both"),
        ("~wavy~ and ~~struck~~", "wavy and struck"),
        ("(laughs) [aside] {stage} <thought>", "laughs aside stage thought"),
        ("_italic_ and `code` and # Heading", "italic and code and Heading"),
        ("a | b \\ c ^ d", "a b c d"),
        ("（笑）【注】〔注〕〈注〉《书》「引」『引』～", "笑注注注书引引"),
    ],
)
def test_markup_is_not_spoken(text, spoken):
    assert filter_text(text, "standard") == spoken


def test_what_is_spoken_as_words_stays():
    # AllTalk drops these too; the front-end reads them ("percent", "and", "plus"...).
    text = "50% of 2+2=4 & more @ 3/4 for €5, 20°C — fine… “quoted” 'too'"
    assert filter_text(text, "standard") == text


def test_html_entities_are_the_authors_text():
    assert filter_text("<b>*hi*</b> &lt;3 &amp; &#42;", "html") == "hi <3 & *"


def test_none_keeps_the_markup():
    assert filter_text("*waves*", "none") == "*waves*"
