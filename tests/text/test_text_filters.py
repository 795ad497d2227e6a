"""Text filtering modes none | standard | html."""

from __future__ import annotations

import pytest

from lowvox.errors import InvalidRequest
from lowvox.text import filter_text


def test_none_changes_nothing():
    text = "Wow!!! <b>x</b> &amp; 😀\x00"
    assert filter_text(text, "none") == text


def test_repeated_marks_collapse():
    assert filter_text("Wow!!! Really??? Well.... ok", "standard") == "Wow! Really? Well. ok"
    assert filter_text("Really?!", "standard") == "Really?!"


def test_scripts_of_the_17_languages_are_kept():
    text = "Café Ölçü Żółć Ελλάδα Москва العربية हिन्दी 中文 ひらがな カタカナ 한국어 1,5 € 20% ¿sí?"
    assert filter_text(text, "standard") == text


def test_other_scripts_emoji_and_controls_are_dropped():
    assert filter_text("Hi 😀 there 👍🏽!", "standard") == "Hi there !"
    assert filter_text("שלום ok ไทย", "standard") == "ok"
    assert filter_text("a\x00b\x07c\u200bd", "standard") == "abcd"
    assert filter_text("tab\there\r\nnext   line", "standard") == "tab here\nnext line"


def test_html_tags_stripped_and_entities_unescaped():
    html = "<p>Fish &amp; chips</p><script>alert(1)</script><style>p{}</style>&lt;3 &#233;"
    assert filter_text(html, "html") == "Fish & chips <3 é"
    # standard mode leaves markup alone: it is text unless the caller says it is HTML
    assert "&amp;" in filter_text("Fish &amp; chips", "standard")


@pytest.mark.parametrize("mode", ["none", "standard", "html"])
def test_empty_input(mode):
    assert filter_text("", mode) == ""


def test_bad_mode():
    with pytest.raises(InvalidRequest):
        filter_text("x", "strict")
