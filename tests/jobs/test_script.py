"""Planning a document into the lines a job speaks: sentences, voices, pauses, tags."""

from __future__ import annotations

import pytest

from lowvox.errors import BadDocument, InvalidRequest, UnknownVoice
from lowvox.jobs.model import Chapter, Document, Line
from lowvox.jobs.script import Narrator, count_chars, count_words, plan_lines, strip_emphasis


def book(*chapters: tuple[str, ...], titles: tuple[str, ...] = ()) -> Document:
    # Untitled by default: a title is spoken as its chapter's first line (tested below).
    names = titles or ("",) * len(chapters)
    return Document("Book", tuple(Chapter(t, ps) for t, ps in zip(names, chapters, strict=True)))


def spoken(lines: list[Line]) -> list[tuple[str, str | None]]:
    return [(line.text, line.voice) for line in lines]


def test_lines_keep_their_chapter_and_paragraph_and_split_into_sentences():
    doc = book(
        ("The first sentence. The second one.", "   ", "A third paragraph."),
        ("Another chapter.",),
    )
    lines = plan_lines(doc, language="en", max_chars=25)
    assert [(ln.chapter, ln.paragraph, ln.text) for ln in lines] == [
        (0, 0, "The first sentence."),
        (0, 0, "The second one."),
        (0, 2, "A third paragraph."),  # the blank paragraph says nothing, keeps its index
        (1, 0, "Another chapter."),
    ]
    assert all(ln.voice is None and ln.pause_before == ln.pause_after == 0 for ln in lines)


def test_every_sentence_is_a_line_of_its_own():
    doc = book(("One.  Two.\nThree.",))
    assert spoken(plan_lines(doc, language="en")) == [
        ("One.", None),
        ("Two.", None),
        ("Three.", None),
    ]


def test_chapter_titles_are_announced_first_unless_turned_off():
    doc = book(("Text here.",), ("More text.",), titles=("The *Start*", "Two"))
    lines = plan_lines(doc, language="en")
    assert [(ln.chapter, ln.paragraph, ln.text) for ln in lines] == [
        (0, -1, "The Start"),
        (0, 0, "Text here."),
        (1, -1, "Two"),
        (1, 0, "More text."),
    ]
    assert [ln.text for ln in plan_lines(doc, language="en", titles=False)] == [
        "Text here.",
        "More text.",
    ]


def test_long_sentence_is_cut_under_the_limit_at_word_boundaries():
    words = [f"word{i}" for i in range(120)]
    doc = book((" ".join(words) + ".",))
    lines = plan_lines(doc, language="en")
    assert len(lines) > 1
    assert all(len(ln.text) <= 250 for ln in lines)  # XTTS's English limit
    assert " ".join(ln.text for ln in lines).rstrip(".").split() == words

    short = plan_lines(doc, language="zh-cn")  # Chinese chunks are much shorter
    assert all(len(ln.text) <= 82 for ln in short) and len(short) > len(lines)


def test_sentences_are_not_packed_even_under_the_limit():
    doc = book(("Aaaaaaaaa. Bbbbbbbbb. Cc.",))
    lines = plan_lines(doc, language="en", max_chars=20)
    assert [ln.text for ln in lines] == ["Aaaaaaaaa.", "Bbbbbbbbb.", "Cc."]


def test_voice_tag_spans_sentences_within_a_paragraph():
    doc = book(("Before. [voice:Bob]One line. Two lines.[/voice] After.",))
    assert spoken(plan_lines(doc, language="en", max_chars=12)) == [
        ("Before.", None),
        ("One line.", "Bob"),
        ("Two lines.", "Bob"),
        ("After.", None),
    ]


def test_pauses_attach_to_the_line_before_or_the_first_line_after():
    doc = book(
        ("[pause:2] Opening. [pause:0.5][pause:1]", "[pause:3]Next paragraph. Done [pause:.25]"),
        ("[pause:4]Second chapter.",),
    )
    lines = plan_lines(doc, language="en")
    assert [(ln.text, ln.pause_before, ln.pause_after) for ln in lines] == [
        ("Opening.", 2.0, 4.5),  # 0.5 + 1, and the next paragraph's leading 3
        ("Next paragraph.", 0.0, 0.0),
        ("Done", 0.0, 0.25),
        ("Second chapter.", 4.0, 0.0),  # nothing before it in its chapter
    ]


def test_pause_in_a_sentence_cuts_it_there():
    doc = book(("Wait for it [pause:1.5] now.",))
    lines = plan_lines(doc, language="en")
    assert [(ln.text, ln.pause_after) for ln in lines] == [("Wait for it", 1.5), ("now.", 0.0)]


def test_narrator_mode_gives_narration_and_speech_their_voices():
    doc = book(('*She looked up.* "Who is there?" she asked. "Me."',))
    plain = plan_lines(doc, language="en", narrator=Narrator("Nara", "Cole"))
    assert spoken(plain) == [
        ("She looked up.", "Nara"),
        ("Who is there?", "Cole"),
        ("she asked.", "Cole"),  # outside both: the character's
        ("Me.", "Cole"),
    ]
    narrated = plan_lines(doc, language="en", narrator=Narrator("Nara", None, "narrator"))
    assert spoken(narrated) == [
        ("She looked up.", "Nara"),
        ("Who is there?", None),  # None: the job's own voice
        ("she asked.", "Nara"),
        ("Me.", None),
    ]
    silent = plan_lines(doc, language="en", narrator=Narrator("Nara", "Cole", "silent"))
    assert spoken(silent) == [
        ("She looked up.", "Nara"),
        ("Who is there?", "Cole"),
        ("Me.", "Cole"),
    ]


def test_tags_keep_their_place_in_narrator_mode_even_in_silent_text():
    doc = book(('"One." [pause:2] "Two." [voice:Bob]Bob speaks.[/voice] "Three."',))
    lines = plan_lines(doc, language="en", narrator=Narrator("N", "C", "silent"))
    assert [(ln.text, ln.voice, ln.pause_after) for ln in lines] == [
        ("One.", "C", 2.0),
        ("Two.", "C", 0.0),
        ("Bob speaks.", "Bob", 0.0),
        ("Three.", "C", 0.0),
    ]
    quoted = book(('"Hi, [voice:Bob]Bob here.[/voice] Bye [pause:1] now." he said.',))
    lines = plan_lines(quoted, language="en", narrator=Narrator("N", "C", "narrator"))
    assert [(ln.text, ln.voice, ln.pause_after) for ln in lines] == [
        ("Hi,", "C", 0.0),
        ("Bob here.", "Bob", 0.0),
        ("Bye", "C", 1.0),
        ("now.", "C", 0.0),
        ("he said.", "N", 0.0),
    ]


def test_emphasis_markers_are_not_read_without_narrator_mode():
    doc = book(("It was *very* **bold** and ***loud***, _quiet_ and __calm__.",))
    text = plan_lines(doc, language="en")[0].text
    assert text == "It was very bold and loud, quiet and calm."
    kept = "Don't touch snake_case, 2 * 3 or file_name_here's."
    assert strip_emphasis(kept) == kept


def test_bracketed_prose_is_read_as_written():
    doc = book(("He said [sic] it [1]. [Note: a remark.] [Ed:x] [https://x.org] See [a]b.",))
    said = "".join(ln.text for ln in plan_lines(doc, language="en"))
    assert said.replace(" ", "") == doc.chapters[0].paragraphs[0].replace(" ", "")


@pytest.mark.parametrize(
    ("paragraph", "problem"),
    [
        ("Hello [voise:Bob]there", "unknown tag [voise:Bob]"),
        ("Wait [pause:soon].", "bad tag [pause:soon]"),
        ("Wait [pause:0].", "more than 0 and at most 30"),
        ("Wait [pause:45].", "more than 0 and at most 30"),
        ("Wait [pause].", "bad tag [pause]"),
        ("[voice:Bob]Never closed.", "[voice:Bob] in"),
        ("Closed [/voice] early.", "closes no [voice:"),
        ("[voice:A]One [voice:B]two[/voice][/voice]", "do not nest"),
        ("[voice:]Nobody[/voice]", "write [voice:Name]"),
    ],
)
def test_malformed_tags_say_where_they_are(paragraph, problem):
    doc = book(("Fine.", paragraph), titles=("The Storm",))
    with pytest.raises(BadDocument) as e:
        plan_lines(doc, language="en")
    message = str(e.value)
    assert problem in message
    assert 'chapter 1 "The Storm", paragraph 2' in message
    assert e.value.status_code == 400 and e.value.field == "file"


def test_unknown_voice_in_a_tag_is_a_404_saying_where():
    doc = book(("Hi.",), ("[voice:Zed]Hello.[/voice]",), titles=("One", "Two"))
    with pytest.raises(UnknownVoice) as e:
        plan_lines(doc, language="en", known_voices={"Bob"})
    assert e.value.status_code == 404
    assert "'Zed'" in str(e.value) and 'chapter 2 "Two", paragraph 1' in str(e.value)

    lines = plan_lines(doc, language="en", known_voices={"Zed"}, titles=False)
    assert spoken(lines) == [("Hi.", None), ("Hello.", "Zed")]


def test_bad_narrator_mode_and_limit_are_refused():
    doc = book(("Hi.",))
    with pytest.raises(InvalidRequest, match="text_not_inside"):
        plan_lines(doc, language="en", narrator=Narrator("N", "C", "whisper"))
    with pytest.raises(InvalidRequest, match="max_chars"):
        plan_lines(doc, language="en", max_chars=0)


def test_language_outside_xtts_uses_english_sentence_rules():
    doc = book(("Hej. Hur mår du?",))
    assert spoken(plan_lines(doc, language="sv", max_chars=12)) == [
        ("Hej.", None),
        ("Hur mår du?", None),
    ]


def test_counts_leave_tags_out():
    doc = book(("[voice:Bob]Two  words[/voice] [pause:1]", "Three more words."))
    assert count_words(doc) == 5
    assert count_chars(doc) == len("Two words") + len("Three more words.")


@pytest.mark.parametrize("unit", ["[a:", "[voice:", "[pause:1", "[/voice:x"])
def test_the_tag_pattern_does_work_linear_in_the_paragraph(unit):
    # A paragraph of brackets that never close: each match attempt used to scan to the
    # end of the paragraph, so 120 kB of "[a:" took a minute to plan, and the jobs API
    # takes millions of characters. Steps are counted on the model matcher.
    from lowvox.jobs import script
    from tests.text.test_number_patterns_linear import GROWTH_LIMIT, growth

    ratio = growth(script._TAG, lambda n: unit * (n // len(unit) + 1))
    assert ratio < GROWTH_LIMIT, f"work grew {ratio:.1f}x over 4x input"


def test_a_tag_value_holds_no_bracket():
    # "[voice:a[b]": the "[b]" is prose, and so is what comes before it.
    doc = book(("Say [voice:a[b] that.",))
    assert "".join(ln.text for ln in plan_lines(doc, language="en")) == "Say [voice:a[b] that."


@pytest.mark.parametrize(
    "paragraphs",
    [
        ("Hi. " + "[pause:30]" * 1_000,),  # was 30,000 s of silence after "Hi."
        ("Hi. [pause:20]", "[pause:20]More."),  # after a line, across paragraphs
        ("[pause:20][pause:20]Hi.",),  # before the chapter's first line
    ],
)
def test_pauses_that_meet_come_to_at_most_30_seconds(paragraphs):
    # Ten characters of tags each asked for 30 s more of silence at the same point: a
    # 100 kB job made a book of 83 hours of silence, 14 GB as WAV.
    with pytest.raises(BadDocument, match="add up to") as e:
        plan_lines(book(paragraphs), language="en")
    assert "at most 30" in str(e.value) and e.value.status_code == 400


def test_pauses_that_meet_may_come_to_30_seconds():
    lines = plan_lines(book(("[pause:10][pause:20]Hi. [pause:15][pause:15]",)), language="en")
    assert [(ln.pause_before, ln.pause_after) for ln in lines] == [(30.0, 30.0)]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("mode", ["character", "silent"])
def test_narrator_mode_plans_a_paragraph_of_quotes_in_one_pass(mode):
    # Narrator mode puts a mark after every quote and asterisk, and each mark looked at
    # every mark before it: 40 kB of quotes took 20 s, 60 kB 45 s, and a job may hold 5
    # million characters. This takes well under a second; the timeout stops a hang.
    paragraph = '"*' * 30_000 + '"Hello," she said. [pause:1] *Fine.*'
    lines = plan_lines(book((paragraph,)), language="en", narrator=Narrator("N", "C", mode))
    assert (lines[-1].text, lines[-1].voice) == ("Fine.", "N")
    assert lines[-2].text.startswith("Hello,") and lines[-2].voice == "C"
    assert lines[-2].pause_after == 1.0
