"""Reading uploads into chapters: plain text, Markdown, and EPUB 2/3 books built here."""

from __future__ import annotations

import io
import struct
import zipfile
from dataclasses import dataclass

import pytest

from lowvox.errors import BadDocument
from lowvox.jobs.readers import DOCUMENT_KINDS, read_document

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 32


# ---------------------------------------------------------------------------------------
# A small EPUB writer


@dataclass
class Page:
    name: str  # file name under OEBPS/
    body: str  # XHTML inside <body>
    toc: str | None = None  # its title in the table of contents
    linear: bool = True
    body_type: str = ""  # epub:type on <body>


def xhtml(body: str, body_type: str = "", title: str = "The Book") -> str:
    kind = f' epub:type="{body_type}"' if body_type else ""
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<html xmlns="http://www.w3.org/1999/xhtml" xmlns:epub="http://www.idpf.org/2007/ops">'
        f"<head><title>{title}</title><style>p {{ margin: 0 }}</style></head>"
        f"<body{kind}>{body}</body></html>"
    )


def make_epub(
    pages: list[Page],
    *,
    version: int = 3,
    title: str = "The Book",
    author: str = "Ann Author",
    language: str = "en",
    cover: bytes | None = None,
    toc_extra: tuple[tuple[str, str], ...] = (),  # more (href, title) contents entries
    guide: tuple[tuple[str, str], ...] = (),  # (type, href): EPUB 2 guide, EPUB 3 landmarks
    extra: dict[str, bytes] | None = None,  # more zip entries, e.g. META-INF/rights.xml
) -> bytes:
    toc = [(p.name, p.toc) for p in pages if p.toc] + list(toc_extra)
    manifest = [
        f'<item id="p{i}" href="{p.name}" media-type="application/xhtml+xml"/>'
        for i, p in enumerate(pages)
    ]
    manifest.reverse()  # manifest order is not reading order
    spine = [
        f'<itemref idref="p{i}" linear="{"yes" if p.linear else "no"}"/>'
        for i, p in enumerate(pages)
    ]
    meta = ""
    files: dict[str, str | bytes] = {}
    if cover is not None:
        kind = "image/png" if cover.startswith(b"\x89PNG") else "image/jpeg"
        props = ' properties="cover-image"' if version == 3 else ""
        manifest.append(
            f'<item id="cover-img" href="images/cover.img" media-type="{kind}"{props}/>'
        )
        if version == 2:
            meta = '<meta name="cover" content="cover-img"/>'
        files["OEBPS/images/cover.img"] = cover
    if version == 3:
        manifest.append(
            '<item id="nav" href="nav.xhtml" media-type="application/xhtml+xml" properties="nav"/>'
        )
        spine.insert(0, '<itemref idref="nav"/>')  # books often read their contents page
        entries = "".join(f'<li><a href="{h}">{t}</a></li>' for h, t in toc)
        marks = "".join(f'<li><a epub:type="{k}" href="{h}">{k}</a></li>' for k, h in guide)
        files["OEBPS/nav.xhtml"] = xhtml(
            f'<nav epub:type="toc"><h1>Contents</h1><ol>{entries}</ol></nav>'
            f'<nav epub:type="landmarks"><ol>{marks}</ol></nav>'
        )
        guide_xml = ""
    else:
        manifest.append('<item id="ncx" href="toc.ncx" media-type="application/x-dtbncx+xml"/>')
        points = "".join(
            f'<navPoint id="n{i}" playOrder="{i + 1}"><navLabel><text>{t}</text></navLabel>'
            f'<content src="{h}"/></navPoint>'
            for i, (h, t) in enumerate(toc)
        )
        files["OEBPS/toc.ncx"] = (
            '<?xml version="1.0"?><ncx xmlns="http://www.daisy.org/z3986/2005/ncx/" '
            f'version="2005-1"><docTitle><text>{title}</text></docTitle>'
            f"<navMap>{points}</navMap></ncx>"
        )
        refs = "".join(f'<reference type="{k}" href="{h}" title="{k}"/>' for k, h in guide)
        guide_xml = f"<guide>{refs}</guide>"
    toc_attr = ' toc="ncx"' if version == 2 else ""
    files["OEBPS/content.opf"] = (
        '<?xml version="1.0" encoding="utf-8"?>'
        f'<package xmlns="http://www.idpf.org/2007/opf" version="{version}.0" '
        'unique-identifier="id"><metadata xmlns:dc="http://purl.org/dc/elements/1.1/">'
        f'<dc:identifier id="id">urn:x</dc:identifier><dc:title>{title}</dc:title>'
        f"<dc:creator>{author}</dc:creator><dc:language>{language}</dc:language>{meta}"
        f"</metadata><manifest>{''.join(manifest)}</manifest>"
        f"<spine{toc_attr}>{''.join(spine)}</spine>{guide_xml}</package>"
    )
    for p in pages:
        files[f"OEBPS/{p.name}"] = xhtml(p.body, p.body_type)
    files["META-INF/container.xml"] = (
        '<?xml version="1.0"?><container version="1.0" '
        'xmlns="urn:oasis:names:tc:opendocument:xmlns:container"><rootfiles>'
        '<rootfile full-path="OEBPS/content.opf" media-type="application/oebps-package+xml"/>'
        "</rootfiles></container>"
    )
    files.update(extra or {})
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("mimetype", "application/epub+zip", compress_type=zipfile.ZIP_STORED)
        for name, content in files.items():
            z.writestr(name, content)
    return out.getvalue()


def encryption_xml(*algorithms: str) -> bytes:
    items = "".join(
        '<enc:EncryptedData xmlns:enc="http://www.w3.org/2001/04/xmlenc#">'
        f'<enc:EncryptionMethod Algorithm="{a}"/><enc:CipherData>'
        f'<enc:CipherReference URI="OEBPS/f{i}"/></enc:CipherData></enc:EncryptedData>'
        for i, a in enumerate(algorithms)
    )
    return (
        f'<encryption xmlns="urn:oasis:names:tc:opendocument:xmlns:container">{items}</encryption>'
    ).encode()


def lie_about_size(data: bytes, name: str, size: int) -> bytes:
    """The zip with `name`'s uncompressed size set to `size` in both of its headers."""
    buf = bytearray(data)
    offset = zipfile.ZipFile(io.BytesIO(data)).getinfo(name).header_offset
    struct.pack_into("<I", buf, offset + 22, size)  # local file header
    central = buf.find(b"PK\x01\x02")
    while central != -1:
        name_len = struct.unpack_from("<H", buf, central + 28)[0]
        if buf[central + 46 : central + 46 + name_len] == name.encode():
            struct.pack_into("<I", buf, central + 24, size)
            return bytes(buf)
        central = buf.find(b"PK\x01\x02", central + 4)
    raise AssertionError(f"{name} not in the central directory")


BOOK = [
    Page(
        "ch1.xhtml",
        "<h1>Chapter One: Arrival</h1><p>She came at dawn.</p>"
        '<p>Bread &amp; <em>salt</em> were waiting<sup><a epub:type="noteref" '
        'href="notes.xhtml#n1">1</a></sup>.</p>'
        '<aside epub:type="footnote" id="n0"><p>An inline footnote.</p></aside>',
        toc="Chapter One: Arrival",
    ),
    Page(
        "ch2.xhtml",
        "<h1>Chapter Two</h1><div>First line<br/>second   line</div>"
        "<script>var spoken = false;</script><p>“Hello,” he said.</p>",
        toc="Chapter Two",
    ),
    Page("aside.xhtml", "<p>An optional sidebar.</p>", linear=False),
    Page(
        "notes.xhtml",
        '<section epub:type="endnotes"><p id="n1">1. An endnote.</p></section>',
        toc="Notes",
    ),
]


# ---------------------------------------------------------------------------------------
# EPUB


def test_epub3_reads_chapters_in_spine_order_with_titles_metadata_and_cover():
    doc = read_document(make_epub(BOOK, cover=PNG), "book.epub")

    assert (doc.title, doc.author, doc.language) == ("The Book", "Ann Author", "en")
    assert [c.title for c in doc.chapters] == ["Chapter One: Arrival", "Chapter Two"]
    assert doc.chapters[0].paragraphs == ("She came at dawn.", "Bread & salt were waiting.")
    assert doc.chapters[1].paragraphs == ("First line", "second line", "“Hello,” he said.")
    assert (doc.cover, doc.cover_type) == (PNG, "image/png")


def test_epub3_leaves_out_contents_notes_and_non_linear_pages():
    doc = read_document(make_epub(BOOK), "book.epub")
    text = " ".join(p for c in doc.chapters for p in c.paragraphs)
    for unread in ("Contents", "footnote", "endnote", "sidebar", "spoken", "1."):
        assert unread not in text
    assert doc.cover is None and doc.cover_type is None


def test_epub2_titles_from_the_ncx_and_notes_pages_from_the_guide():
    pages = [
        Page("title.xhtml", "<h2>The Book</h2><p>A novel.</p>"),  # not in the contents
        Page(
            "one.xhtml",
            '<p>It began<sup><a href="back.xhtml#fn1">[1]</a></sup> here.</p>',
            toc="One",
        ),
        Page("back.xhtml", '<p id="fn1">[1] A plain endnote.</p>'),
    ]
    guide = (("notes", "back.xhtml"), ("text", "one.xhtml"))
    doc = read_document(make_epub(pages, version=2, cover=JPEG, guide=guide), "old.epub")

    assert [c.title for c in doc.chapters] == ["The Book", "One"]
    assert doc.chapters[0].paragraphs == ("A novel.",)  # the heading is the title
    assert doc.chapters[1].paragraphs == ("It began here.",)
    assert (doc.cover, doc.cover_type) == (JPEG, "image/jpeg")


def test_epub3_landmarks_mark_whole_pages_as_notes():
    pages = [Page("a.xhtml", "<p>Story.</p>", toc="A"), Page("n.xhtml", "<p>A note.</p>")]
    doc = read_document(make_epub(pages, guide=(("endnotes", "n.xhtml"),)), "b.epub")
    assert [c.paragraphs for c in doc.chapters] == [("Story.",)]


def test_epub_page_holding_several_chapters_is_split_where_the_contents_point():
    body = (
        '<h2 id="c1">One</h2><p>First chapter.</p>'
        '<h2 id="c2">Two</h2><p>Second chapter.</p><p>More of it.</p>'
    )
    epub = make_epub(
        [Page("all.xhtml", body)], toc_extra=(("all.xhtml#c1", "One"), ("all.xhtml#c2", "Two"))
    )
    doc = read_document(epub, "b.epub")
    assert [(c.title, c.paragraphs) for c in doc.chapters] == [
        ("One", ("First chapter.",)),
        ("Two", ("Second chapter.", "More of it.")),
    ]


def test_epub_with_font_obfuscation_only_is_read():
    extra = {
        "META-INF/encryption.xml": encryption_xml(
            "http://www.idpf.org/2008/embedding", "http://ns.adobe.com/pdf/enc#RC"
        )
    }
    doc = read_document(make_epub(BOOK, extra=extra), "fonts.epub")
    assert doc.chapters[0].title == "Chapter One: Arrival"


@pytest.mark.parametrize(
    "extra",
    [
        {"META-INF/encryption.xml": encryption_xml("http://www.w3.org/2001/04/xmlenc#aes128-cbc")},
        {
            "META-INF/encryption.xml": encryption_xml(
                "http://www.idpf.org/2008/embedding", "http://www.w3.org/2001/04/xmlenc#aes256-cbc"
            )
        },
        {"META-INF/rights.xml": b"<rights/>"},
    ],
    ids=["encryption.xml", "fonts-and-text", "rights.xml"],
)
def test_epub_with_drm_is_refused(extra):
    with pytest.raises(BadDocument, match=r"encrypted \(DRM\)") as e:
        read_document(make_epub(BOOK, extra=extra), "locked.epub")
    assert e.value.status_code == 400 and e.value.field == "file"


def test_not_a_zip_is_refused():
    with pytest.raises(BadDocument, match="not an EPUB"):
        read_document(b"%PDF-1.7 this is not a zip", "book.epub")


def test_zip_without_container_is_refused():
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("chapter.xhtml", xhtml("<p>Text.</p>"))
    with pytest.raises(BadDocument, match="container.xml is missing"):
        read_document(out.getvalue(), "book.epub")


def test_container_pointing_at_a_missing_package_is_refused():
    epub = make_epub(BOOK)
    broken = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(epub)) as src, zipfile.ZipFile(broken, "w") as dst:
        for info in src.infolist():
            if info.filename != "OEBPS/content.opf":
                dst.writestr(info, src.read(info))
    with pytest.raises(BadDocument, match="package file"):
        read_document(broken.getvalue(), "book.epub")


def test_zip_bomb_by_declared_size_is_refused():
    pages = [Page("big.xhtml", "<p>" + "a " * 1_000_000 + "</p>", toc="Big")]
    epub = make_epub(pages)
    assert len(epub) < 100_000  # small on the wire, 2 MB unpacked
    with pytest.raises(BadDocument, match="MiB allowed"):
        read_document(epub, "bomb.epub", max_unpacked_bytes=2**20)


def test_zip_bomb_with_a_lying_size_header_is_refused():
    pages = [Page("big.xhtml", "<p>" + "a " * 1_000_000 + "</p>", toc="Big")]
    epub = lie_about_size(make_epub(pages), "OEBPS/big.xhtml", 1000)
    with pytest.raises(BadDocument, match="more than the 1000 bytes it declares"):
        read_document(epub, "bomb.epub", max_unpacked_bytes=2**20)


def test_damaged_entry_is_refused_as_damaged():
    epub = bytearray(make_epub(BOOK))
    offset = zipfile.ZipFile(io.BytesIO(bytes(epub))).getinfo("OEBPS/ch1.xhtml").header_offset
    epub[offset + 30 + len("OEBPS/ch1.xhtml") + 15] ^= 0xFF  # a byte of the compressed page
    with pytest.raises(BadDocument, match="damaged"):
        read_document(bytes(epub), "book.epub")


def test_zip_with_too_many_entries_is_refused():
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for i in range(10_001):
            z.writestr(f"f{i}", b"")
    with pytest.raises(BadDocument, match="more than 10000"):
        read_document(out.getvalue(), "many.epub")


def test_compression_that_epub_does_not_allow_is_refused():
    epub = make_epub(BOOK)
    repacked = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(epub)) as src, zipfile.ZipFile(repacked, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_BZIP2)
    with pytest.raises(BadDocument, match="compression"):
        read_document(repacked.getvalue(), "book.epub")


def test_epub_without_text_is_refused():
    pages = [Page("cover.xhtml", '<div><img src="images/cover.img" alt="Cover"/></div>', "Cover")]
    with pytest.raises(BadDocument, match="has no text"):
        read_document(make_epub(pages, cover=PNG), "empty.epub")


# ---------------------------------------------------------------------------------------
# Plain text


def test_text_chapters_from_heading_lines_and_paragraphs_from_blank_lines():
    text = (
        "A foreword\nin two lines.\n\n"
        "Chapter 1\n\nIt was a dark\nand stormy night.\n\nThe end of it.\n\n"
        "CHAPTER IV.\nFour.\n\n"
        "Chapter One: The Title\n\nChapter 1 was the best, she said.\n"
    )
    doc = read_document(text.encode(), "My Story.txt")
    assert doc.title == "My Story"
    assert [(c.title, c.paragraphs) for c in doc.chapters] == [
        ("", ("A foreword in two lines.",)),
        ("Chapter 1", ("It was a dark and stormy night.", "The end of it.")),
        ("CHAPTER IV.", ("Four.",)),
        ("Chapter One: The Title", ("Chapter 1 was the best, she said.",)),
    ]


def test_text_without_headings_is_one_untitled_chapter():
    doc = read_document("\ufeffOne.\r\n\r\nTwo.\r\n".encode(), "notes.text")
    assert [(c.title, c.paragraphs) for c in doc.chapters] == [("", ("One.", "Two."))]


def test_text_in_utf16_with_a_bom_is_read():
    doc = read_document("Grüße aus Köln.".encode("utf-16"), "de.txt")
    assert doc.chapters[0].paragraphs == ("Grüße aus Köln.",)


def test_text_that_is_not_utf8_is_refused():
    with pytest.raises(BadDocument, match="not UTF-8"):
        read_document("café au lait".encode("latin-1"), "menu.txt")


def test_empty_text_is_refused():
    with pytest.raises(BadDocument, match="has no text"):
        read_document(b"\n\n  \n", "blank.txt")


def test_unknown_extension_is_refused_naming_the_supported_kinds():
    with pytest.raises(BadDocument, match="unsupported document kind .pdf") as e:
        read_document(b"%PDF", "book.pdf")
    assert all(kind in str(e.value) for kind in DOCUMENT_KINDS)


# ---------------------------------------------------------------------------------------
# Markdown

MARKDOWN = """---
title: "Front Matter Title"
author: Jane Doe
---

# The Book

An introduction with a [link](https://example.com/a_(b)) and an ![image](i.png).

## The First Chapter

- a *list* item
- another item

> a quoted
> line

```python
print("code is not read")
```

    indented code is not read either

### A Section

Text with `code`, <b>HTML</b>, a [reference][r], "quotes" and _emphasis_.

[r]: https://example.com

Second Chapter
--------------

[voice:Bob]Tags stay[/voice] for the planner. [pause:1]
"""


def test_markdown_single_top_heading_names_the_book_and_level_two_are_chapters():
    doc = read_document(MARKDOWN.encode(), "book.md")
    assert (doc.title, doc.author) == ("Front Matter Title", "Jane Doe")
    assert [c.title for c in doc.chapters] == ["", "The First Chapter", "Second Chapter"]
    assert doc.chapters[0].paragraphs == ("An introduction with a link and an .",)
    assert doc.chapters[1].paragraphs == (
        "a *list* item",
        "another item",
        "a quoted line",
        "A Section",
        'Text with code, HTML, a reference, "quotes" and _emphasis_.',
    )
    assert doc.chapters[2].paragraphs == (
        "[voice:Bob]Tags stay[/voice] for the planner. [pause:1]",
    )


def test_markdown_top_most_level_is_the_chapter_level():
    text = "## One\n\nFirst.\n\n#### Deep\n\nMore.\n\n## Two ##\n\nSecond.\n"
    doc = read_document(text.encode(), "notes.markdown")
    assert doc.title == "notes"
    assert [(c.title, c.paragraphs) for c in doc.chapters] == [
        ("One", ("First.", "Deep", "More.")),
        ("Two", ("Second.",)),
    ]


def test_markdown_several_level_one_headings_are_chapters():
    text = "# One\n\nFirst.\n\n## Part\n\nMore.\n\n# Two\n\nSecond.\n"
    doc = read_document(text.encode(), "b.md")
    assert [(c.title, c.paragraphs) for c in doc.chapters] == [
        ("One", ("First.", "Part", "More.")),
        ("Two", ("Second.",)),
    ]


def test_markdown_single_heading_titles_the_book():
    doc = read_document(b"# My Story\n\nOnce upon a time.\n", "x.md")
    assert doc.title == "My Story"
    assert [(c.title, c.paragraphs) for c in doc.chapters] == [("My Story", ("Once upon a time.",))]


def test_markdown_comments_raw_blocks_and_code_spans_are_unwrapped():
    text = (
        "A <!-- hidden --> B <!-- never closed\n\n"
        "C <script>x()</script> D <STYLE>p {}</style > E <script> open\n\n"
        "F `code` and ``a ` b`` G ``` unmatched\n\n"
        "# Title ##\n\nx\n\n# #\n\ny\n\n# Only text #hash\n\nz\n"
    )
    doc = read_document(text.encode(), "x.md")
    assert doc.chapters[0].paragraphs == (
        "A B <!-- never closed",
        "C D E open",  # the unclosed <script> is a tag, as HTML in a paragraph is
        "F code and a ` b G ``` unmatched",
    )
    assert [ch.title for ch in doc.chapters[1:]] == ["Title", "#", "Only text #hash"]


# A Markdown job may hold millions of characters: every pattern and scan of the reader
# does work linear in it. Each of these took minutes to hours at this size (quadratic, or
# cubic for the backticks) before; the timeout only stops a hang.
_PATHOLOGICAL = {
    "unclosed comments": "<!--" * 250_000,
    "unclosed script": "<script" * 150_000,
    "unclosed style": "<style>x" * 120_000,
    "link labels": "[a:" * 300_000,
    "link definitions": "[\n" * 200_000,
    "images": "![" * 500_000,
    "CDATA": "<![CDATA[" * 100_000,
    "heading spaces": "Text.\n\n# a" + " " * 1_000_000 + "b\n\nMore.",
    "backticks": "x" + "`" * 1_000_000,
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(_PATHOLOGICAL))
def test_markdown_reading_is_linear_in_the_text(name):
    text = _PATHOLOGICAL[name]
    doc = read_document(text.encode(), "big.md")
    assert sum(len(p) for ch in doc.chapters for p in ch.paragraphs) > 0


@pytest.mark.parametrize(
    ("pattern", "unit"),
    [
        ("_IMAGE", "!["),
        ("_INLINE_LINK", "[a:"),
        ("_REF_LINK", "[a:"),
        ("_SHORTCUT_LINK", "[a:"),
    ],
)
def test_markdown_inline_patterns_do_linear_work(pattern, unit):
    from lowvox.jobs import readers
    from tests.text.test_number_patterns_linear import GROWTH_LIMIT, growth

    ratio = growth(getattr(readers, pattern), lambda n: unit * n + "b")
    assert ratio < GROWTH_LIMIT, f"work grew {ratio:.1f}x over 4x input"


# ---------------------------------------------------------------------------------------
# EPUB pages that are broken or built to be slow


def _page_paragraphs(body: str, *, whole: str | None = None) -> list[str]:
    """The paragraphs read from a page of `body`, or from a page that is just `whole`."""
    epub = make_epub([Page("ch1.xhtml", body, toc="One")])
    if whole is not None:
        epub = epub_with(epub, "OEBPS/ch1.xhtml", whole)
    doc = read_document(epub, "b.epub")
    return [p for ch in doc.chapters for p in ch.paragraphs]


# At the end of a page, Python 3.11's HTMLParser read each `<` of a construct never closed
# (no `>`, or no `-->`, up to the end of the page) as text and parsed the rest of the page
# again after it: hours for a page of a few hundred kilobytes (80,000 characters of "<a "
# took 47 s). The timeout only stops a hang.
_UNCLOSED = {
    "start tags": "<a " * 100_000,
    "start tags with attributes": "<p x" * 100_000,
    "end tags": "</a " * 100_000,
    "comments": "<!--" * 100_000,
    "processing instructions": "<?" * 150_000,
}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", sorted(_UNCLOSED))
def test_epub_page_with_unclosed_markup_is_read_in_linear_time(name):
    whole = "<html><body><p>Before.</p>" + _UNCLOSED[name]
    assert _page_paragraphs("", whole=whole) == ["Before."]


def test_epub_page_ends_an_unclosed_construct_at_the_end_of_the_page():
    # As HTML reads it: the construct runs to the end of the page and is not text.
    assert _page_paragraphs('<p>Kept.</p><p>Cut <a href="x') == ["Kept.", "Cut"]
    assert _page_paragraphs("<p>Kept.</p><!-- never closed <p>gone</p>") == ["Kept."]
    assert _page_paragraphs("<p>A &lt; b, and a trailing <") == ["A < b, and a trailing <"]


def test_epub_page_with_a_bad_marked_section_is_read():
    # "<![" without CDATA after it raised AssertionError inside HTMLParser.
    assert _page_paragraphs("<p>One <![ x ]> two <![CDATA[three]]></p><p>four <![</p>") == [
        "One two",
        "four",
    ]


def test_epub_nav_closed_before_its_link_is_read():
    # </nav> before </a> left the link without its <nav>: IndexError.
    page = Page("ch1.xhtml", "<p>Text.</p>")
    epub = make_epub([page])
    broken = epub_with(
        epub,
        "OEBPS/nav.xhtml",
        xhtml('<nav epub:type="toc"><ol><li><a href="ch1.xhtml">Chapter</nav></a></li></ol>'),
    )
    doc = read_document(broken, "b.epub")
    assert [(ch.title, ch.paragraphs) for ch in doc.chapters] == [("Chapter", ("Text.",))]


@pytest.mark.parametrize("encoding", ["idna", "undefined", "punycode", "unicode_escape"])
def test_epub_page_declaring_a_python_only_codec_is_read_as_utf8(encoding):
    # errors="replace" made idna and undefined raise UnicodeError, punycode failed anyway.
    page = xhtml("<p>Caf\u00e9 \\x41.</p>").replace('encoding="utf-8"', f'encoding="{encoding}"')
    epub = epub_with(make_epub([Page("ch1.xhtml", "x", toc="One")]), "OEBPS/ch1.xhtml", page)
    doc = read_document(epub, "b.epub")
    assert doc.chapters[0].paragraphs == ("Caf\u00e9 \\x41.",)


def test_epub_hrefs_that_urlsplit_refuses_are_links_out_of_the_book():
    # "//[" is an unterminated IPv6 host: urlsplit raised ValueError.
    epub = make_epub(
        [Page("ch1.xhtml", "<p>Text.</p>", toc="One")],
        toc_extra=(("//[", "Bad"), ("http://[x/y", "Worse")),
        guide=(("toc", "//[x"),),
    )
    doc = read_document(epub, "b.epub")
    assert [(ch.title, ch.paragraphs) for ch in doc.chapters] == [("One", ("Text.",))]


def test_epub2_ncx_nested_thousands_deep_is_read():
    # Points were read by recursion: RecursionError past about 1,000 levels.
    depth = 5_000
    deeper = '<navPoint><navLabel><text>Deeper</text></navLabel><content src="ch1.xhtml#x"/>'
    points = (
        '<navPoint><navLabel><text>One</text></navLabel><content src="ch1.xhtml"/>'
        + deeper * depth
        + "</navPoint>" * (depth + 1)
    )
    ncx = (
        '<?xml version="1.0"?><ncx xmlns="http://www.daisy.org/z3986/2005/ncx/" '
        f'version="2005-1"><navMap>{points}</navMap></ncx>'
    )
    epub = make_epub([Page("ch1.xhtml", "<p>Text.</p>", toc="One")], version=2)
    doc = read_document(epub_with(epub, "OEBPS/toc.ncx", ncx), "b.epub")
    assert [(ch.title, ch.paragraphs) for ch in doc.chapters] == [("One", ("Text.",))]


@pytest.mark.timeout(20)
def test_epub_spine_naming_one_page_many_times_reads_it_once():
    # A book whose spine named one page n times, and whose contents pointed at it n times,
    # read the page n times, each time looking at every entry of the contents, and at all
    # of them again for each (cubic): a 2 KB book with n = 1,000 took 21 s.
    n = 20_000
    epub = make_epub([Page("ch1.xhtml", "<p>Text.</p>", toc="One")])
    opf = zip_entry(epub, "OEBPS/content.opf").replace(
        b'<itemref idref="p0" linear="yes"/>', b'<itemref idref="p0"/>' * n
    )
    nav = zip_entry(epub, "OEBPS/nav.xhtml").replace(
        b'<li><a href="ch1.xhtml">One</a></li>', b'<li><a href="ch1.xhtml">One</a></li>' * n
    )
    epub = epub_with(epub_with(epub, "OEBPS/content.opf", opf), "OEBPS/nav.xhtml", nav)
    doc = read_document(epub, "b.epub")
    assert [(ch.title, ch.paragraphs) for ch in doc.chapters] == [("One", ("Text.",))]


def zip_entry(epub: bytes, name: str) -> bytes:
    with zipfile.ZipFile(io.BytesIO(epub)) as z:
        return z.read(name)


def epub_with(epub: bytes, name: str, content: str | bytes) -> bytes:
    """The EPUB with one entry's content replaced."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(epub)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, content if info.filename == name else src.read(info))
    return out.getvalue()
