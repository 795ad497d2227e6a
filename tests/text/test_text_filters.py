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


@pytest.mark.parametrize("mode", ["standard", "html"])
def test_cjk_iteration_mark_and_ideographic_zero_are_kept(mode):
    # 々 repeats the kanji before it (時々 is "tokidoki"), 〇 is the zero of written dates.
    assert filter_text("人々は時々来る。", mode) == "人々は時々来る。"
    assert filter_text("二〇二四年に〆切", mode) == "二〇二四年に〆切"


@pytest.mark.parametrize("mode", ["standard", "html"])
def test_latin_ligatures_are_spelled_out(mode):
    # Text copied from PDFs and e-books: dropping the ligature drops letters mid-word.
    assert filter_text("The ﬁrst ﬂoor has ﬀ and ﬃ.", mode) == "The first floor has ff and ffi."


def test_html_mode_strips_only_what_parses_as_a_tag():
    assert filter_text("1 < 2 and 3 > 2, so x", "html") == "1 2 and 3 2, so x"
    assert filter_text("I <3 you > them", "html") == "I 3 you them"
    assert filter_text("<p>a<br/>b</p><!-- note --><!DOCTYPE html>c", "html") == "a b c"
    assert filter_text("<SCRIPT>x()</Script>ok <style>p{}</STYLE >fine", "html") == "ok fine"
    # An element left open hides nothing: its text is all there is.
    assert filter_text("<script>one</script>two <script>three", "html") == "two three"


@pytest.mark.parametrize("mode", ["standard", "html"])
def test_terminal_colour_codes_go_whole(mode):
    """Text pasted from a console keeps its colour codes (ESC [ 31 m ... ESC [ 0 m); the
    escape character alone went, leaving "31m" to be read out."""
    coloured = "\x1b[1;31mError:\x1b[0m the disk \x1b[4mis\x1b[24m full.\x1b[K"
    assert filter_text(coloured, mode) == "Error: the disk is full."
