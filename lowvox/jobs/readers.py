"""Readers: a plain-text, Markdown or EPUB file to a `Document` of chapters and paragraphs.

`read_document` picks the reader by the file name's extension (`DOCUMENT_KINDS`). Every
reader keeps only what is meant to be read aloud: chapter headings become chapter titles,
paragraphs become plain text (inline `[voice:…]`/`[pause:…]` tags, `*` and quotes are
kept for the planner, `lowvox.jobs.script`), and code, markup, navigation and notes are
left out. Anything that cannot be read raises `BadDocument` with a message for the user.

EPUB 2 and 3 are read here with `zipfile` and `defusedxml` (no EPUB library): entries are
looked up by name in memory and never extracted, and the unpacked size is bounded before
and while reading, so a zip bomb is refused instead of filling memory.
"""

from __future__ import annotations

import codecs
import io
import logging
import posixpath
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from html import unescape
from html.parser import HTMLParser
from urllib.parse import unquote, urlsplit
from xml.etree.ElementTree import Element, ParseError

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring as parse_xml

from lowvox.errors import BadDocument
from lowvox.jobs.model import Chapter, Document

logger = logging.getLogger(__name__)

DOCUMENT_KINDS: tuple[str, ...] = (".txt", ".text", ".md", ".markdown", ".epub")
MAX_UNPACKED_BYTES = 200 * 2**20
MAX_ZIP_ENTRIES = 10_000


def read_document(
    data: bytes, filename: str, *, max_unpacked_bytes: int = MAX_UNPACKED_BYTES
) -> Document:
    """Read an uploaded file into a `Document`; the extension of `filename` says its kind.

    `max_unpacked_bytes` bounds what an EPUB may unpack to. Raises `BadDocument` for an
    unsupported kind, undecodable text, a damaged, encrypted or oversized EPUB, or a file
    with no text to read."""
    name = posixpath.basename(filename.replace("\\", "/")) or "document"
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    ext = f".{ext.lower()}" if ext else ""
    title = " ".join(stem.split()) or "Untitled"
    if ext in (".txt", ".text"):
        doc = _read_text(_decode_text(data, name), title)
    elif ext in (".md", ".markdown"):
        doc = _read_markdown(_decode_text(data, name), title)
    elif ext == ".epub":
        doc = _read_epub(data, name, title, max_unpacked_bytes)
    else:
        raise BadDocument(
            f"{name}: unsupported document kind {ext or '(no extension)'}; "
            f"supported: {', '.join(DOCUMENT_KINDS)}"
        )
    if not doc.chapters:
        raise BadDocument(f"{name} has no text to read")
    return doc


def _clean(text: str) -> str:
    """Whitespace collapsed to single spaces; soft hyphens and zero-width characters gone."""
    return " ".join(text.translate(_INVISIBLE).split())


_INVISIBLE = dict.fromkeys(map(ord, "\u00ad\u200b\u200c\u200d\u2060\ufeff"))


def _decode_text(data: bytes, name: str) -> str:
    codec = "utf-16" if data.startswith((b"\xff\xfe", b"\xfe\xff")) else "utf-8-sig"
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as e:
        raise BadDocument(
            f"{name} is not UTF-8 text (undecodable byte at offset {e.start}); "
            "save it as UTF-8 and upload it again"
        ) from e
    if "\x00" in text:
        raise BadDocument(f"{name} is not a text file (it holds binary data)")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _chapters(sections: list[tuple[str, list[str]]]) -> tuple[Chapter, ...]:
    """Chapters from (title, paragraphs), leaving out those with nothing to read (a table
    of contents listing chapter headings reads as a run of empty chapters)."""
    out = []
    for title, paragraphs in sections:
        kept = tuple(p for p in (_clean(p) for p in paragraphs) if p)
        if kept:
            out.append(Chapter(title=_clean(title), paragraphs=kept))
    return tuple(out)


# ---------------------------------------------------------------------------------------
# Plain text

_NUMBER_WORDS = (
    "one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|"
    "fifteen|sixteen|seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|sixty|seventy|"
    "eighty|ninety|hundred"
)
_ROMAN = r"(?=[mdclxvi])m{0,4}(?:cm|cd|d?c{0,3})(?:xc|xl|l?x{0,3})(?:ix|iv|v?i{0,3})"
# "Chapter 1", "CHAPTER IV.", "Chapter One: The Title", "Chapter Twenty-One - Home".
_TEXT_HEADING = re.compile(
    rf"chapter\s+(?:\d+|{_ROMAN}|(?:{_NUMBER_WORDS})(?:[- ](?:{_NUMBER_WORDS}))?)"
    r"(?:\s*[.:\-\u2013\u2014]\s*.*)?",
    re.IGNORECASE,
)


def _read_text(text: str, title: str) -> Document:
    """Paragraphs split at blank lines; a "Chapter …" line of its own starts a chapter."""
    sections: list[tuple[str, list[str]]] = [("", [])]
    lines: list[str] = []

    def end_paragraph() -> None:
        if lines:
            sections[-1][1].append(" ".join(lines))
            lines.clear()

    for raw in text.split("\n"):
        line = raw.strip()
        if not line:
            end_paragraph()
        elif len(line) <= 120 and _TEXT_HEADING.fullmatch(line):
            end_paragraph()
            sections.append((line, []))
        else:
            lines.append(line)
    end_paragraph()
    return Document(title=title, chapters=_chapters(sections))


# ---------------------------------------------------------------------------------------
# Markdown

_FRONT_MATTER = re.compile(r"\A---[ \t]*\n(.*?)\n(?:---|\.\.\.)[ \t]*(?:\n|\Z)", re.DOTALL)
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
# A heading's optional closing `#`s are taken off by `_atx_text`: a lazy `(.*?)` followed
# by optional spaces and `#`s went back over a line's run of spaces once per character.
_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*))?$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_RULE = re.compile(r"^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
_QUOTE = re.compile(r"^ {0,3}>[ \t]?")
_LIST_ITEM = re.compile(r"^[ \t]*(?:[-+*]|\d{1,9}[.)])(?:[ \t]+|$)")
_INDENTED = re.compile(r"^(?: {4}|\t)")
# `[label]: destination "optional title"`, alone on its line.
_LINK_DEF = re.compile(
    r"^ {0,3}\[([^\[\]]+)\]:[ \t]*(?:<[^>\n]*>|\S+)"
    r"(?:[ \t]+(?:\"[^\"\n]*\"|'[^'\n]*'|\([^)\n]*\)))?[ \t]*$",
    re.MULTILINE,
)
# Comments, <script>/<style> blocks and code spans are found by `_without_comments`,
# `_without_raw_blocks` and `_code_spans`, and link labels hold no `[`: a pattern that
# runs on to the end of the text from every opening that is never closed does work
# quadratic in the text (cubic for code spans), and a job's text may be 5 million
# characters (120 kB of "<!--" took 12 s, 40 kB of "x" and backticks ten minutes).
_RAW_OPEN = re.compile(r"<(script|style)\b", re.IGNORECASE)
_RAW_CLOSE = {name: re.compile(rf"</{name}\s*>", re.IGNORECASE) for name in ("script", "style")}
_TICKS = re.compile(r"`+")

_IMAGE = re.compile(r"!\[[^\[\]]*\](?:\((?:[^()]|\([^()]*\))*\)|\[[^\[\]]*\])")
_INLINE_LINK = re.compile(r"\[([^\[\]]*)\]\((?:[^()]|\([^()]*\))*\)")
_REF_LINK = re.compile(r"\[([^\[\]]+)\]\[([^\[\]]*)\]")
_SHORTCUT_LINK = re.compile(r"\[([^\[\]]+)\](?![\[(:])")
_AUTOLINK = re.compile(r"<(?:[a-z][a-z0-9+.-]{1,31}:[^<>\s]*|[^<>\s@]+@[^<>\s@]+)>", re.I)
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>")
_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")
_STRIKE = re.compile(r"~~(.+?)~~")


def _front_matter(text: str) -> tuple[dict[str, str], str]:
    """YAML front matter's simple `key: value` lines, and the text after it."""
    m = _FRONT_MATTER.match(text)
    if not m:
        return {}, text
    meta = {}
    for line in m.group(1).split("\n"):
        key, colon, value = line.partition(":")
        if colon and key.strip() and not key.startswith((" ", "\t", "-")):
            meta[key.strip().lower()] = value.strip().strip("'\"").strip()
    return meta, text[m.end() :]


def _without_comments(text: str) -> str:
    """`text` without its `<!-- … -->` comments; one never closed is left as it is."""
    out: list[str] = []
    pos = 0
    while (start := text.find("<!--", pos)) != -1:
        end = text.find("-->", start + 4)
        if end == -1:  # no later comment closes either
            break
        out.append(text[pos:start])
        pos = end + 3
    out.append(text[pos:])
    return "".join(out)


def _without_raw_blocks(text: str) -> str:
    """`text` without its `<script>…</script>` and `<style>…</style>` blocks (any case);
    one never closed is left as it is."""
    out: list[str] = []
    pos = search = 0
    unclosed: set[str] = set()  # no closing tag after here: later openings need no look
    while (m := _RAW_OPEN.search(text, search)) is not None:
        name = m.group(1).lower()
        close = None if name in unclosed else _RAW_CLOSE[name].search(text, m.end())
        if close is None:
            unclosed.add(name)
            search = m.end()
            continue
        out.append(text[pos : m.start()])
        pos = search = close.end()
    out.append(text[pos:])
    return "".join(out)


def _code_spans(text: str) -> str:
    """Code spans unwrapped (their text, stripped): a run of backticks opens one that the
    next run of the same length closes; a run that nothing closes stays as it is."""
    runs = [m.span() for m in _TICKS.finditer(text)]
    if len(runs) < 2:
        return text
    closer: dict[int, int] = {}  # run -> the next run of the same length
    last: dict[int, int] = {}  # length -> the latest run of that length
    for i in range(len(runs) - 1, -1, -1):
        length = runs[i][1] - runs[i][0]
        if length in last:
            closer[i] = last[length]
        last[length] = i
    out: list[str] = []
    pos = i = 0
    while i < len(runs):
        j = closer.get(i)
        if j is None:
            i += 1
            continue
        (start, opened), (closed, end) = runs[i], runs[j]
        out += [text[pos:start], text[opened:closed].strip()]
        pos, i = end, j + 1
    out.append(text[pos:])
    return "".join(out)


def _atx_text(rest: str | None) -> str:
    """An ATX heading's text: `rest` without its closing `#`s (those after a space)."""
    text = (rest or "").rstrip(" \t")
    bare = text.rstrip("#")
    if bare != text and bare[-1:] in (" ", "\t"):
        return bare.rstrip(" \t")
    return text


def _md_inline(text: str, refs: set[str]) -> str:
    """Markdown inline syntax to the text it shows: images gone, links as their text,
    code spans and HTML unwrapped; emphasis markers and quotes are kept."""

    def ref_link(m: re.Match[str]) -> str:
        label = (m.group(2) or m.group(1)).strip().lower()
        return m.group(1) if label in refs else m.group(0)

    def shortcut(m: re.Match[str]) -> str:
        return m.group(1) if m.group(1).strip().lower() in refs else m.group(0)

    text = _code_spans(text)
    text = _IMAGE.sub("", text)
    text = _INLINE_LINK.sub(r"\1", text)
    text = _REF_LINK.sub(ref_link, text)
    text = _SHORTCUT_LINK.sub(shortcut, text)
    text = _AUTOLINK.sub("", text)
    text = _HTML_TAG.sub("", text)
    text = _STRIKE.sub(r"\1", text)
    text = _ESCAPE.sub(r"\1", text)
    return unescape(text)


def _md_blocks(text: str, refs: set[str]) -> list[tuple[int, str]]:
    """The body as (heading level, text) blocks in order; level 0 is a paragraph."""
    blocks: list[tuple[int, str]] = []
    lines: list[str] = []
    fence: str | None = None  # the opening fence while inside a fenced code block
    in_code = in_list = after_blank = False

    def end_paragraph() -> None:
        if lines:
            blocks.append((0, _md_inline(" ".join(lines), refs)))
            lines.clear()

    for line in text.split("\n"):
        if fence is not None:
            closing = line.strip()
            if len(closing) >= len(fence) and closing == fence[0] * len(closing):
                fence = None
            continue
        if not line.strip():
            end_paragraph()
            after_blank = True
            continue
        blank_before, after_blank = after_blank, False
        if in_code and _INDENTED.match(line):
            continue
        in_code = False
        if (m := _FENCE.match(line)) is not None:
            end_paragraph()
            fence = m.group(1)
            continue
        if _INDENTED.match(line) and not lines and not in_list and (blank_before or not blocks):
            in_code = True  # an indented code block: a blank line, then 4 spaces or a tab
            continue
        if (m := _ATX.match(line)) is not None:
            end_paragraph()
            blocks.append((len(m.group(1)), _md_inline(_atx_text(m.group(2)), refs)))
            in_list = False
            continue
        if lines and not in_list and (m := _SETEXT.match(line)) is not None:
            blocks.append((1 if m.group(1)[0] == "=" else 2, _md_inline(" ".join(lines), refs)))
            lines.clear()
            continue
        if _RULE.match(line):
            end_paragraph()
            continue
        while (m := _QUOTE.match(line)) is not None:
            line = line[m.end() :]
        if not line.strip():  # a ">" alone separates paragraphs of a quote
            end_paragraph()
            continue
        if (m := _LIST_ITEM.match(line)) is not None and not _RULE.match(line):
            end_paragraph()  # each list item reads as a paragraph of its own
            line = line[m.end() :]
            in_list = True
        elif blank_before and not _INDENTED.match(line):
            in_list = False
        lines.append(line.strip())
    end_paragraph()
    return blocks


def _read_markdown(text: str, title: str) -> Document:
    """ATX (and setext) headings start chapters: the top-most level present, or `##` when a
    single `#` at the top names the book. Deeper headings read as paragraphs."""
    meta, body = _front_matter(text)
    body = _without_raw_blocks(_without_comments(body))
    refs = {m.group(1).strip().lower() for m in _LINK_DEF.finditer(body)}
    blocks = _md_blocks(_LINK_DEF.sub("", body), refs)

    headings = [i for i, (level, _) in enumerate(blocks) if level]
    levels = {blocks[i][0] for i in headings}
    top_ones = [i for i in headings if blocks[i][0] == 1]
    book_title = meta.get("title") or ""
    chapter_level = min(levels) if levels else 0
    if len(top_ones) == 1 and top_ones[0] == headings[0]:
        # One `#` heading above all others: it names the book, `##` are the chapters.
        book_title = book_title or _clean(blocks[top_ones[0]][1])
        if 2 in levels:
            chapter_level = 2
            del blocks[top_ones[0]]

    sections: list[tuple[str, list[str]]] = [("", [])]
    for level, text_ in blocks:
        if level and level == chapter_level:
            sections.append((text_, []))
        else:
            sections[-1][1].append(text_)
    return Document(
        title=_clean(book_title) or title,
        chapters=_chapters(sections),
        author=meta.get("author") or None,
        language=meta.get("language") or meta.get("lang") or None,
    )


# ---------------------------------------------------------------------------------------
# EPUB: the zip

# Font obfuscation (IDPF and Adobe) only scrambles embedded fonts; the text is readable.
_FONT_OBFUSCATION = {"http://www.idpf.org/2008/embedding", "http://ns.adobe.com/pdf/enc#RC"}
_READ_PIECE = 64 * 1024


class _Zip:
    """An EPUB's zip, read by entry name in memory, with its unpacked size bounded."""

    def __init__(self, data: bytes, name: str, max_unpacked_bytes: int) -> None:
        self.name = name
        self._data = data
        try:
            infos = zipfile.ZipFile(io.BytesIO(data)).infolist()
        except (
            zipfile.BadZipFile,
            zipfile.LargeZipFile,
            struct.error,
            NotImplementedError,
            ValueError,
            OSError,
            EOFError,
        ) as e:
            raise BadDocument(f"{name} is not an EPUB (not a valid zip file)") from e
        if len(infos) > MAX_ZIP_ENTRIES:
            raise BadDocument(
                f"{name} holds {len(infos)} files (more than {MAX_ZIP_ENTRIES}); refusing it"
            )
        declared = sum(i.file_size for i in infos)
        if declared > max_unpacked_bytes:
            raise BadDocument(
                f"{name} unpacks to {declared / 2**20:.0f} MiB, more than the "
                f"{max_unpacked_bytes / 2**20:.0f} MiB allowed; refusing it"
            )
        self._infos = {i.filename: i for i in infos if not i.is_dir()}
        self._folded = {n.lower(): i for n, i in reversed(self._infos.items())}

    def find(self, path: str) -> zipfile.ZipInfo | None:
        # Exact name first; sloppy books get the case of their own file names wrong.
        return self._infos.get(path) or self._folded.get(path.lower())

    def read(self, path: str) -> bytes | None:
        """The entry's bytes, or None when there is none; never more than it declares."""
        info = self.find(path)
        if info is None:
            return None
        if info.flag_bits & 0x1:
            raise BadDocument(f"{self.name} is encrypted (password-protected zip)")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            # EPUB allows only these two; others (bzip2, lzma) inflate without a bound.
            raise BadDocument(f"{self.name}: {path} uses a compression EPUB does not allow")
        out = self._unpack(info, path)
        if zlib.crc32(out) != info.CRC:
            raise BadDocument(f"{self.name} is damaged: {path} fails its checksum")
        return out

    def _unpack(self, info: zipfile.ZipInfo, path: str) -> bytes:
        """Inflate the entry ourselves, in bounded pieces, from its local header on: zipfile
        would quietly stop at the declared size, and a header that lies about the size is
        a zip bomb to refuse, not a file to cut short."""
        offset = info.header_offset
        head = self._data[offset : offset + 30]
        if len(head) < 30 or head[:4] != b"PK\x03\x04":
            raise BadDocument(f"{self.name} is damaged: cannot find {path} in it")
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        start = offset + 30 + name_len + extra_len
        raw = self._data[start : start + info.compress_size]
        if len(raw) < info.compress_size:
            raise BadDocument(f"{self.name} is damaged: {path} is cut short")
        too_big = BadDocument(
            f"{self.name}: {path} unpacks to more than the {info.file_size} bytes it "
            "declares (a zip bomb?); refusing it"
        )
        if info.compress_type == zipfile.ZIP_STORED:
            if len(raw) > info.file_size:
                raise too_big
            return raw
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, as zip stores it
        pieces, size, pending = [], 0, raw
        try:
            while not inflater.eof:
                piece = inflater.decompress(pending, _READ_PIECE)
                pending = inflater.unconsumed_tail
                size += len(piece)
                if size > info.file_size:
                    raise too_big
                if not piece and not pending:
                    raise BadDocument(f"{self.name} is damaged: {path} is cut short")
                pieces.append(piece)
        except zlib.error as e:
            raise BadDocument(f"{self.name} is damaged: cannot unpack {path} ({e})") from e
        return b"".join(pieces)

    def check_drm(self) -> None:
        if self.find("META-INF/rights.xml") or self.find("META-INF/sinf.xml"):
            raise BadDocument(f"{self.name} is encrypted (DRM); only DRM-free EPUBs can be read")
        raw = self.read("META-INF/encryption.xml")
        if raw is None:
            return
        root = _xml(raw, self.name, "META-INF/encryption.xml")
        algorithms = {
            el.get("Algorithm", "") for el in root.iter() if _local(el.tag) == "EncryptionMethod"
        }
        if algorithms - _FONT_OBFUSCATION:
            raise BadDocument(f"{self.name} is encrypted (DRM); only DRM-free EPUBs can be read")


def _local(tag: object) -> str:
    """An element's name without its namespace."""
    return tag.rpartition("}")[2] if isinstance(tag, str) else ""


def _xml(raw: bytes, name: str, path: str) -> Element:
    try:
        return parse_xml(raw)
    except (ParseError, DefusedXmlException, ValueError) as e:
        raise BadDocument(f"{name} is damaged: {path} is not valid XML ({e})") from e


def _resolve(base: str, href: str) -> tuple[str, str] | None:
    """An href inside the book, relative to the file `base`, as (zip path, fragment); None
    for links that leave the book, or that cannot be read (`//[`, a bad IPv6 host)."""
    try:
        parts = urlsplit(href)
    except ValueError:
        return None
    if parts.scheme or parts.netloc:
        return None
    path = unquote(parts.path)
    if not path:
        return base, parts.fragment
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(base), path).lstrip("/"))
    if joined.startswith("../") or joined == "..":
        return None
    return joined, parts.fragment


def _decode_markup(raw: bytes) -> str:
    """XHTML bytes as text: BOM, then the XML declaration's encoding, then UTF-8."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16", errors="replace")
    codec = "utf-8-sig"
    m = re.match(rb"\s*<\?xml[^>]*encoding=[\"']([A-Za-z0-9._-]+)[\"']", raw)
    if m:
        codec = m.group(1).decode("ascii")
    try:
        if codecs.lookup(codec).name not in _NOT_CHARSETS:
            return raw.decode(codec, errors="replace")
    except (LookupError, UnicodeError):  # an encoding name Python does not know
        pass
    return raw.decode("utf-8-sig", errors="replace")


# Python codecs that are not character sets a page can be written in: they refuse
# errors="replace" (idna, undefined), fail anyway (punycode) or read escapes as text.
_NOT_CHARSETS = {"idna", "punycode", "undefined", "unicode-escape", "raw-unicode-escape"}


# ---------------------------------------------------------------------------------------
# EPUB: pages to text

# epub:type / DPUB-ARIA role values whose content is not read: notes, note references and
# navigation (a list of chapters, of landmarks, of pages).
_UNREAD_TYPES = {
    "footnote", "footnotes", "endnote", "endnotes", "rearnote", "rearnotes", "noteref",
    "toc", "landmarks", "page-list", "pagelist", "pagebreak", "loi", "lot",
}  # fmt: skip
_UNREAD_TAGS = {"script", "style", "nav", "svg", "math", "rt", "rp", "template", "noscript"}
_BLOCK_TAGS = {
    "p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "li", "blockquote", "br", "section",
    "article", "header", "footer", "aside", "main", "ul", "ol", "dl", "dt", "dd", "pre", "hr",
    "figure", "figcaption", "table", "caption", "thead", "tbody", "tfoot", "tr", "td", "th",
    "address", "center", "body",
}  # fmt: skip
_VOID_TAGS = {"br", "hr", "img", "meta", "link", "input", "col", "area", "base", "wbr"}


def _types(attrs: dict[str, str | None]) -> set[str]:
    """An element's semantic types, from epub:type and role (without role's "doc-")."""
    words = f"{attrs.get('epub:type') or ''} {attrs.get('role') or ''}".lower().split()
    return {w.removeprefix("doc-") for w in words}


@dataclass
class _Part:
    """A stretch of one page that reads as one chapter."""

    title: str | None
    paragraphs: list[str]
    heading: str = ""  # the first h1/h2 in it, a title when the table of contents has none


class _Markup(HTMLParser):
    """`HTMLParser` as Python 3.11 ships it, without two of its faults on broken pages.

    `<![` not followed by CDATA or another keyword raised AssertionError; it is read as
    a bogus comment (to the next `>`), as HTML does. And at the end of the page, every
    `<` that begins a construct never closed (`<a`, `</x`, `<!--`, `<?`) was read as
    text and the rest of the page parsed again from just after it: time quadratic in the
    page (80,000 characters of `<a ` took 47 s). Such a construct now runs to the end of
    the page and is dropped, as HTML (and Python from 3.13.4 on) reads it."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)

    def parse_marked_section(self, i: int, report: bool = True) -> int:
        try:
            return super().parse_marked_section(i, report)
        except AssertionError:
            return self.parse_bogus_comment(i)

    def close(self) -> None:
        # feed() parsed every construct it could close; what is left, unless it is the
        # text of an unclosed <script>/<style>, begins with the first that it could not.
        rest = self.rawdata
        if not self.cdata_elem and rest.startswith("<") and rest not in ("<", "</"):
            self.rawdata = ""
        super().close()


class _PageText(_Markup):
    """An XHTML page's readable text, as paragraphs. Block elements break paragraphs; notes,
    note references, navigation, scripts and ruby readings are left out. An element whose
    id is in `anchors` (a table-of-contents target) starts a new part with that title."""

    def __init__(self, title: str | None, anchors: dict[str, str]) -> None:
        super().__init__()
        self.parts = [_Part(title, [])]
        self.page_title = ""
        self._anchors = anchors
        self._text: list[str] = []
        self._skip: tuple[str, int] | None = None  # (tag, depth) of the subtree left out
        self._where: str | None = None  # "head", "title" or a heading being captured
        self._head: list[str] | None = None
        self._sups: list[list] = []  # per open <sup>: [text position, holds a link, breaks]
        self._breaks = 0  # paragraph breaks so far, to tell whether a <sup> spans one

    def _break(self) -> None:
        text = _clean("".join(self._text))
        self._text.clear()
        self._breaks += 1
        if text:
            self.parts[-1].paragraphs.append(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._skip is not None:
            if tag == self._skip[0] and tag not in _VOID_TAGS:
                self._skip = (tag, self._skip[1] + 1)
            return
        a = dict(attrs)
        if tag in _UNREAD_TAGS or _types(a) & _UNREAD_TYPES or "hidden" in a:
            if tag not in _VOID_TAGS:
                self._skip = (tag, 1)
            return
        anchor = a.get("id")
        if anchor is not None and anchor in self._anchors:
            self._break()
            part = self.parts[-1]
            if part.paragraphs:
                self.parts.append(_Part(self._anchors[anchor], []))
            elif part.title is None:
                part.title = self._anchors[anchor]
        if tag == "head":
            self._where = "head"
        elif tag == "title" and self._where == "head":
            self._where, self._head = "title", []
        elif tag in ("h1", "h2") and not self.parts[-1].heading and self._head is None:
            self._where, self._head = tag, []
        if tag == "sup":
            self._sups.append([len(self._text), False, self._breaks])
        elif tag == "a" and self._sups:
            self._sups[-1][1] = True
        if tag in _BLOCK_TAGS:
            self._break()

    def handle_endtag(self, tag: str) -> None:
        if self._skip is not None:
            if tag == self._skip[0]:
                depth = self._skip[1] - 1
                self._skip = (tag, depth) if depth else None
            return
        if tag == "head":
            self._where = None
        elif tag == self._where and self._head is not None:
            text = _clean("".join(self._head))
            if tag == "title":
                self.page_title, self._where = text, "head"
            else:
                self.parts[-1].heading, self._where = text, None
            self._head = None
        if tag == "sup" and self._sups:
            # A superscript holding a link is a note reference ("¹" pointing at a note).
            start, linked, breaks = self._sups.pop()
            if linked and breaks == self._breaks:
                del self._text[start:]
        if tag in _BLOCK_TAGS:
            self._break()

    def handle_data(self, data: str) -> None:
        if self._skip is not None:
            return
        if self._head is not None:
            self._head.append(data)
        if self._where not in ("head", "title"):
            self._text.append(data)

    def close(self) -> None:
        super().close()
        self._break()


class _NavText(_Markup):
    """An EPUB 3 navigation document: the table of contents as (depth, href, title), and
    the landmarks as (type, href)."""

    def __init__(self) -> None:
        super().__init__()
        self.toc: list[tuple[int, str, str]] = []
        self.landmarks: list[tuple[str, str]] = []
        self._nav: list[str] = []  # the kind of each open <nav>
        self._depth = 0  # <ol> nesting inside the toc nav
        self._link: tuple[str, set[str], str] | None = None  # href, types, nav kind
        self._title: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "nav":
            kinds = _types(a)
            self._nav.append(next((k for k in ("toc", "landmarks") if k in kinds), ""))
        elif tag == "ol" and self._nav:
            self._depth += 1
        elif tag == "a" and self._nav and a.get("href"):
            self._link, self._title = (a["href"] or "", _types(a), self._nav[-1]), []

    def handle_endtag(self, tag: str) -> None:
        if tag == "nav" and self._nav:
            self._nav.pop()
        elif tag == "ol" and self._nav:
            self._depth -= 1
        elif tag == "a" and self._link is not None:
            # The kind of the <nav> the link was opened in: a broken page may close it first.
            href, kinds, nav = self._link
            if nav == "toc":
                self.toc.append((self._depth, href, _clean("".join(self._title))))
            elif nav == "landmarks":
                self.landmarks.extend((k, href) for k in kinds)
            self._link = None

    def handle_data(self, data: str) -> None:
        if self._link is not None:
            self._title.append(data)


# ---------------------------------------------------------------------------------------
# EPUB: the package


@dataclass(frozen=True)
class _Item:
    path: str  # inside the zip
    media_type: str
    properties: frozenset[str]


@dataclass(frozen=True)
class _TocEntry:
    depth: int
    path: str
    fragment: str
    title: str


_DC = "{http://purl.org/dc/elements/1.1/}"
_PAGE_TYPES = {"application/xhtml+xml", "text/html", "application/xml", "text/xml"}
# Guide (EPUB 2) and landmark (EPUB 3) types of whole pages that are not read.
_UNREAD_PAGES = {
    "toc", "notes", "footnotes", "endnotes", "rearnotes", "loi", "lot", "index",
}  # fmt: skip


def _read_epub(data: bytes, name: str, title: str, max_unpacked_bytes: int) -> Document:
    book = _Zip(data, name, max_unpacked_bytes)
    book.check_drm()
    container = book.read("META-INF/container.xml")
    if container is None:
        raise BadDocument(f"{name} is not an EPUB: META-INF/container.xml is missing")
    opf_path = next(
        (
            el.get("full-path", "")
            for el in _xml(container, name, "META-INF/container.xml").iter()
            if _local(el.tag) == "rootfile" and el.get("full-path")
        ),
        "",
    )
    opf_raw = book.read(opf_path) if opf_path else None
    if opf_raw is None:
        raise BadDocument(f"{name} is damaged: its package file (OPF) is missing")
    opf = _xml(opf_raw, name, opf_path)

    items: dict[str, _Item] = {}
    for el in opf.iter():
        if _local(el.tag) == "item" and el.get("id") and el.get("href"):
            where = _resolve(opf_path, el.get("href", ""))
            if where is not None:
                items[el.get("id", "")] = _Item(
                    where[0],
                    el.get("media-type", "").strip().lower(),
                    frozenset(el.get("properties", "").split()),
                )
    spine = next((el for el in opf.iter() if _local(el.tag) == "spine"), None)
    if spine is None:
        raise BadDocument(f"{name} is damaged: its package file has no reading order (spine)")

    toc, unread = _navigation(book, opf, opf_path, items, spine)
    entries: dict[str, list[_TocEntry]] = {}
    for entry in toc:
        entries.setdefault(entry.path, []).append(entry)
    chapters: list[Chapter] = []
    seen: set[str] = set()  # pages read: EPUB lets the spine name each page once
    for ref in spine:
        if _local(ref.tag) != "itemref" or ref.get("linear", "").strip().lower() == "no":
            continue
        item = items.get(ref.get("idref", ""))
        if (
            item is None
            or "nav" in item.properties
            or item.media_type not in _PAGE_TYPES
            or item.path in unread
            or item.path in seen
        ):
            logger.debug("%s: not reading spine item %s", name, ref.get("idref"))
            continue
        seen.add(item.path)
        raw = book.read(item.path)
        found = _page_chapters(raw, entries.get(item.path, [])) if raw else []
        if not found:
            logger.debug("%s: no text in %s", name, item.path)
        chapters.extend(found)
    if not chapters:
        raise BadDocument(f"{name} has no text to read")

    meta: dict[str, list[str]] = {}
    for el in opf.iter():
        tag = el.tag if isinstance(el.tag, str) else ""
        if tag.startswith(_DC) and el.text and el.text.strip():
            meta.setdefault(tag.removeprefix(_DC), []).append(_clean(el.text))
    cover, cover_type = _cover(book, opf, items)
    return Document(
        title=meta.get("title", [title])[0],
        chapters=tuple(chapters),
        author=", ".join(dict.fromkeys(meta["creator"])) if "creator" in meta else None,
        language=meta.get("language", [None])[0],
        cover=cover,
        cover_type=cover_type,
    )


def _navigation(
    book: _Zip, opf: Element, opf_path: str, items: dict[str, _Item], spine: Element
) -> tuple[list[_TocEntry], set[str]]:
    """The table of contents (EPUB 3 nav, else EPUB 2 NCX), and the pages that the guide
    or landmarks mark as not for reading (contents, notes, index)."""
    toc: list[_TocEntry] = []
    unread: set[str] = set()

    def mark_unread(kind: str, base: str, href: str) -> None:
        where = _resolve(base, href)
        # Only whole pages: a landmark pointing into a page says nothing about the rest.
        if kind.lower().removeprefix("other.") in _UNREAD_PAGES and where and not where[1]:
            unread.add(where[0])

    nav = next((i for i in items.values() if "nav" in i.properties), None)
    raw = book.read(nav.path) if nav else None
    if nav is not None and raw is not None:
        parser = _NavText()
        parser.feed(_decode_markup(raw))
        parser.close()
        for depth, href, title in parser.toc:
            if (where := _resolve(nav.path, href)) is not None:
                toc.append(_TocEntry(depth, where[0], where[1], title))
        for kind, href in parser.landmarks:
            mark_unread(kind, nav.path, href)

    ncx = items.get(spine.get("toc", "")) or next(
        (i for i in items.values() if i.media_type == "application/x-dtbncx+xml"), None
    )
    raw = book.read(ncx.path) if ncx and not toc else None
    if ncx is not None and raw is not None:
        nav_map = next(
            (el for el in _xml(raw, book.name, ncx.path).iter() if _local(el.tag) == "navMap"),
            None,
        )
        if nav_map is not None:
            toc.extend(_ncx_points(nav_map, ncx.path))

    for el in opf.iter():
        if _local(el.tag) == "reference" and el.get("href"):
            mark_unread(el.get("type", ""), opf_path, el.get("href", ""))
    return toc, unread


def _ncx_points(nav_map: Element, ncx_path: str) -> list[_TocEntry]:
    """The NCX's navPoints in document order, each with its nesting depth (1 at the top).

    Walked with a stack, not by recursion: a book may nest points thousands deep."""
    out = []
    stack = [(point, 1) for point in reversed(nav_map)]
    while stack:
        point, depth = stack.pop()
        if _local(point.tag) != "navPoint":
            continue
        # Its own label: a point without one does not take its first sub-point's.
        label = next(
            (
                el
                for child in point
                if _local(child.tag) == "navLabel"
                for el in child.iter()
                if _local(el.tag) == "text"
            ),
            None,
        )
        content = next((el for el in point if _local(el.tag) == "content"), None)
        where = _resolve(ncx_path, content.get("src", "")) if content is not None else None
        if where is not None:
            title = _clean("".join(label.itertext())) if label is not None else ""
            out.append(_TocEntry(depth, where[0], where[1], title))
        stack.extend((child, depth + 1) for child in reversed(point))
    return out


def _page_chapters(raw: bytes, entries: list[_TocEntry]) -> list[Chapter]:
    """One page's chapters: usually one, titled by the table of contents; a page that the
    contents enters at several places of the same level is split there."""
    level = min((e.depth for e in entries), default=0)
    top = [e for e in entries if e.depth == level]
    whole = next((e.title for e in top if not e.fragment), None)
    anchors: dict[str, str] = {}
    for e in top:
        if e.fragment:
            anchors.setdefault(e.fragment, e.title)
    parser = _PageText(whole, anchors)
    parser.feed(_decode_markup(raw))
    parser.close()

    chapters = []
    for n, part in enumerate(parser.parts):
        title = part.title or part.heading or (parser.page_title if n == 0 else "") or ""
        paragraphs = part.paragraphs
        if paragraphs and paragraphs[0].casefold() == title.casefold():
            paragraphs = paragraphs[1:]  # the heading on the page is the chapter's title
        if paragraphs:
            chapters.append(Chapter(title=title, paragraphs=tuple(paragraphs)))
    return chapters


def _cover(book: _Zip, opf: Element, items: dict[str, _Item]) -> tuple[bytes | None, str | None]:
    """The cover image (EPUB 3 `cover-image`, else EPUB 2 `<meta name="cover">`), when it
    is a JPEG or PNG."""
    item = next((i for i in items.values() if "cover-image" in i.properties), None)
    if item is None:
        ref = next(
            (
                el.get("content", "").strip()
                for el in opf.iter()
                if _local(el.tag) == "meta" and el.get("name") == "cover"
            ),
            "",
        )
        # Some books put the image's href in `content` instead of its id.
        item = items.get(ref) or next(
            (i for i in items.values() if ref and posixpath.basename(i.path) == ref), None
        )
    raw = book.read(item.path) if item is not None else None
    if raw is None:
        return None, None
    # The bytes say what the image is; manifests get media types wrong.
    if raw.startswith(b"\xff\xd8\xff"):
        return raw, "image/jpeg"
    if raw.startswith(b"\x89PNG\r\n\x1a\n"):
        return raw, "image/png"
    return None, None
