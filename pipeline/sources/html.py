"""Image records and links from one HTML page: selectolax parsing, URL resolution, srcset, alt-text cleaning.

Every image that does not become a record is counted in ``drops`` under one reason:

- ``page_opt_out``: the page's ``<meta name="robots|altforge" content="noai|noimageai">`` opts it out;
- ``no_src``: no src / srcset / lazy-loading attribute; ``bad_url``: none of them resolves to an http(s) URL
  (``data:``, ``javascript:``, unparseable, longer than ``max_url_chars``);
- ``no_alt``: missing or empty (after cleaning) alt text; ``caption_too_long``: longer than ``max_alt_chars``
  after cleaning (dropped, never truncated: a cut caption no longer describes the image, and such alt texts are
  mostly keyword stuffing); ``placeholder_alt``: "image", "logo", numbers only, a file name, a URL, ...;
  ``short_alt``: fewer than ``min_alt_chars`` characters;
- ``duplicate``: the same (url, caption) pair again on the same page.
"""

from __future__ import annotations

import codecs
import html as html_lib
import re
from collections import Counter
from dataclasses import dataclass, field
from html import entities as html_entities
from urllib.parse import urljoin, urlsplit

import ftfy
from selectolax.lexbor import LexborHTMLParser

from pipeline.robots import AGENT_TOKEN, OPT_OUT_DIRECTIVES
from pipeline.sources.records import Record, SeenPairs

OPT_OUT_META_NAMES = frozenset({"robots", AGENT_TOKEN})  # <meta name=...> whose noai / noimageai we honour
# In order of preference, after the srcsets. A lazy-loading attribute holds the real image where the page also has
# one; src then holds a placeholder (a 1-pixel gif or a blurred thumbnail) until scripts swap them.
SRC_ATTRS = ("data-src", "data-lazy-src", "data-original", "src")
SRCSET_ATTRS = ("data-srcset", "srcset")
PRESCAN_BYTES = 4096  # bytes searched for <meta charset>
LATE_META_BYTES = 1 << 16  # bytes searched for a later <meta charset> when the page is not UTF-8
# fmt: off
PLACEHOLDER_ALTS = frozenset({  # alt texts (lower-case, punctuation removed) that say nothing about the image
    "image", "images", "img", "photo", "photos", "picture", "pictures", "pic", "pict", "logo", "icon", "spacer",
    "banner", "thumbnail", "thumb", "untitled", "placeholder", "null", "undefined", "none", "nan", "alt", "alttext",
    "alt text", "blank", "default", "graphic", "avatar", "pixel", "dummy", "unnamed", "screenshot", "gif", "jpg",
    "jpeg", "png", "svg", "webp", "no image", "image placeholder", "featured image", "untitled image",
    "tracking pixel",
})
# fmt: on

_IMAGE_EXT = r"(?:jpe?g|jfif|png|gif|webp|bmp|svg|tiff?|avif|heic|ico)"
_FILE_NAME = re.compile(rf"[\w\-.,+~%()\[\] ]*\.{_IMAGE_EXT}", re.IGNORECASE)  # the whole alt is a file name
_CAMERA_NAME = re.compile(  # camera / CMS default names: IMG_1234, DSC0001, PXL_20230101_123456, image (3)
    r"(?:img|image|dsc[nf]?|pxl|photo|pic|picture|screenshot|screen shot|untitled|unnamed|file|p|dji|gopr|mvimg|wp)"
    r"[\s_-]*\(?\d+\)?(?:[\s_-]+\d+)*",
    re.IGNORECASE,
)
_NUMBERS_ONLY = re.compile(r"[\d\W_]+")
_URL_LIKE = re.compile(r"(?:https?:|www\.|//)\S*|[\w.-]+\.(?:com|org|net|html?|php|aspx?)(?:/\S*)?", re.IGNORECASE)
_NON_WORD = re.compile(r"[\W_]+")
_CHAR_REF = re.compile(r"&(?:#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[A-Za-z][A-Za-z0-9]*;?)")
_META_CHARSET = re.compile(rb"""<meta[^>]*?charset\s*=\s*["']?\s*([A-Za-z0-9_:.\-]+)""", re.IGNORECASE)
_HEADER_CHARSET = re.compile(r"""charset\s*=\s*["']?\s*([A-Za-z0-9_:.\-]+)""", re.IGNORECASE)
_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
# WHATWG labels whose Python codec of the same name decodes differently from a browser.
_ENCODING_ALIASES = {
    "iso-8859-1": "cp1252",
    "iso8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "l1": "cp1252",
    "ascii": "cp1252",
    "us-ascii": "cp1252",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "x-sjis": "cp932",
    "sjis": "cp932",
    "windows-31j": "cp932",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "euc-kr": "cp949",
    "ks_c_5601-1987": "cp949",
    "iso-8859-9": "cp1254",
    "tis-620": "cp874",
}
# Control characters become spaces (then collapse); invisible format characters go.
_INVISIBLE = dict.fromkeys([0x00AD, 0x200B, 0x200E, 0x200F, 0x2060, 0xFEFF, *range(0x202A, 0x202F)])
_TRANSLATE = {c: " " for c in [*range(0x20), *range(0x7F, 0xA0)]} | _INVISIBLE
_FTFY = ftfy.TextFixerConfig(unescape_html=False, uncurl_quotes=False, explain=False)


@dataclass(frozen=True)
class ExtractConfig:
    """Which alt texts and image URLs are kept."""

    min_alt_chars: int = 3  # characters; shorter cleaned alt texts are dropped as short_alt
    max_alt_chars: int = 1000  # characters; longer cleaned alt texts are dropped as caption_too_long
    max_url_chars: int = 2048  # characters; longer image URLs are dropped as bad_url


@dataclass(frozen=True)
class Page:
    """What one parse of a page yields: its kept image records, its links and its robots meta flags."""

    records: list[Record] = field(default_factory=list)
    links: list[str] = field(default_factory=list)  # absolute http(s) URLs, no fragment, first-seen order
    opted_out: bool = False  # meta noai / noimageai, or the caller's X-Robots-Tag verdict
    nofollow: bool = False  # meta robots nofollow


# -- text ------------------------------------------------------------------------------------------------------
def _codec(label: str | None) -> str | None:
    """A Python codec name for an HTTP/HTML charset label, browser semantics; None if unknown."""
    if not label:
        return None
    label = label.strip().strip("\"'").lower()
    label = _ENCODING_ALIASES.get(label, label)
    try:
        info = codecs.lookup(label)
    except LookupError:
        return None
    return info.name if info._is_text_encoding else None  # "hex", "base64", "zlib": bytes-to-bytes, not a charset


def charset_from_content_type(value: str | None) -> str | None:
    """The charset parameter of a Content-Type header value, e.g. ``text/html; charset=cp1252`` -> ``cp1252``."""
    m = _HEADER_CHARSET.search(value or "")
    return m.group(1) if m else None


def decode_html(data: bytes, encoding: str | None = None) -> str:
    """Decode page bytes: BOM, else ``encoding`` (the HTTP charset), else ``<meta charset>``, else UTF-8.

    Bytes that are not valid UTF-8 and declare nothing in the first ``PRESCAN_BYTES`` are read by a ``<meta
    charset>`` further on (within ``LATE_META_BYTES``, after a long inline script, say), else as windows-1252 (the
    browsers' legacy default) rather than UTF-8 with replacement characters, which no later fix could undo.
    """
    for bom, name in _BOMS:
        if data.startswith(bom):
            return data.decode(name, errors="replace")
    codec = _codec(encoding) or _meta_codec(data, PRESCAN_BYTES)
    if codec is not None:
        return data.decode(codec, errors="replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # a browser re-decodes when its parser meets a <meta charset> past the prescan
        return data.decode(_meta_codec(data, LATE_META_BYTES) or "cp1252", errors="replace")


def _meta_codec(data: bytes, limit: int) -> str | None:
    """The codec of the first ``<meta charset>`` within ``limit`` bytes, if any and known."""
    m = _META_CHARSET.search(data, 0, limit)
    codec = _codec(m.group(1).decode("ascii")) if m else None
    if codec is not None and codec.startswith("utf-16"):
        return "utf-8"  # a meta tag readable as ASCII cannot be UTF-16 (HTML spec)
    return codec


def unescape_attribute(value: str) -> str:
    """Decode character references in an attribute value as an HTML parser does.

    Unlike ``html.unescape``, a named reference without its ``;`` stays literal when a letter, a digit or ``=``
    follows it (the HTML standard's rule for attributes), so ``?size=1&region=eu`` keeps its ``&region`` rather
    than becoming ``®ion``, and ``&copy2023`` stays as written.
    """
    return _CHAR_REF.sub(_attribute_ref, value) if "&" in value else value


def _attribute_ref(m: re.Match) -> str:
    ref = m.group(0)
    if ref[1] == "#" or (ref.endswith(";") and ref[1:] in html_entities.html5):
        return html_lib.unescape(ref)  # numeric, or a complete named reference
    name = ref[1:]
    for end in range(len(name), 0, -1):  # the longest entity named without its ";" (only legacy ones are)
        if name[:end] in html_entities.html5:
            rest = name[end:]
            after = rest[:1] or m.string[m.end() : m.end() + 1]
            if after.isalnum() or after == "=":
                return ref  # followed by a letter, digit or "=": literal text
            return html_entities.html5[name[:end]] + rest
    return ref


def clean_text(text: str) -> str:
    """Fix mojibake (ftfy), drop control and zero-width characters, collapse whitespace."""
    if not text.isascii():
        text = ftfy.fix_text(text, _FTFY)
    return " ".join(text.translate(_TRANSLATE).split())


def alt_problem(caption: str, cfg: ExtractConfig) -> str | None:
    """The drop reason for a cleaned alt text, or None if it is a usable caption."""
    if not caption:
        return "no_alt"
    if len(caption) > cfg.max_alt_chars:
        return "caption_too_long"
    words = _NON_WORD.sub(" ", caption.lower()).strip()
    if (
        words in PLACEHOLDER_ALTS
        or _NUMBERS_ONLY.fullmatch(caption)
        or _FILE_NAME.fullmatch(caption)
        or _CAMERA_NAME.fullmatch(caption)
        or _URL_LIKE.fullmatch(caption)
    ):
        return "placeholder_alt"
    if len(caption) < cfg.min_alt_chars:
        return "short_alt"
    return None


# -- URLs ------------------------------------------------------------------------------------------------------
def resolve_url(raw: str | None, base: str) -> str | None:
    """``raw`` made absolute against ``base``, without fragment; None unless it is an http(s) URL with a host."""
    if not raw:
        return None
    raw = raw.strip().replace("\t", "").replace("\n", "").replace("\r", "")
    if not raw:
        return None
    try:
        url = urljoin(base, raw).split("#", 1)[0]
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:  # e.g. a malformed IPv6 host or port
        return None
    if parts.scheme not in ("http", "https") or not host:
        return None
    return parts.scheme + url[len(parts.scheme) :]  # "HTTP://x" -> "http://x"


def parse_srcset(value: str) -> list[tuple[str, str, float]]:
    """``srcset`` candidates as (url, "w" | "x", size); a candidate without descriptor is ("x", 1.0)."""
    out: list[tuple[str, str, float]] = []
    pos, n = 0, len(value)
    while pos < n:
        while pos < n and (value[pos].isspace() or value[pos] == ","):
            pos += 1
        start = pos
        while pos < n and not value[pos].isspace():
            pos += 1
        url, descriptor = value[start:pos], ""
        if url.endswith(","):
            url = url.rstrip(",")
        else:
            start = pos
            while pos < n and value[pos] != ",":
                pos += 1
            descriptor = value[start:pos].strip().lower()
        if not url:
            continue
        kind, size = "x", 1.0
        for token in descriptor.split():
            try:
                if token[-1:] in ("w", "x"):
                    kind, size = token[-1], float(token[:-1])
            except ValueError:
                pass
        out.append((url, kind, size))
    return out


def srcset_by_preference(value: str) -> list[str]:
    """srcset URLs, best first: the largest ``w`` descriptors if any, else the largest ``x`` densities."""
    cands = parse_srcset(value)
    widths = [c for c in cands if c[1] == "w"]
    ranked = sorted(widths or cands, key=lambda c: -c[2])  # stable: ties keep document order
    return [c[0] for c in ranked]


def image_record(
    sources: list[str],
    alt: str | None,
    base_url: str,
    page_url: str | None,
    cfg: ExtractConfig,
    drops: Counter,
    seen: SeenPairs,
) -> Record | None:
    """One image's record from its candidate URLs (best first) and alt text, or None with the reason counted."""
    if not sources:
        drops["no_src"] += 1
        return None
    url = next((u for u in (resolve_url(s, base_url) for s in sources) if u), None)
    if url is None or len(url) > cfg.max_url_chars:
        drops["bad_url"] += 1
        return None
    caption = clean_text(alt or "")
    reason = alt_problem(caption, cfg)
    if reason is None and not seen.first_time(url, caption):
        reason = "duplicate"
    if reason is not None:
        drops[reason] += 1
        return None
    return Record(url=url, caption=caption, page_url=page_url, alt_raw=alt)


def _img_sources(attrs: dict) -> list[str]:
    """Candidate URLs of one ``<img>``: data-srcset and srcset (best first), then the lazy-loading attributes,
    then src."""
    out: list[str] = []
    for name in SRCSET_ATTRS:
        if attrs.get(name):
            out.extend(srcset_by_preference(attrs[name]))
    out.extend(attrs[name] for name in SRC_ATTRS if attrs.get(name))
    return out


# -- pages -----------------------------------------------------------------------------------------------------
def _tree(html: bytes | str, encoding: str | None) -> LexborHTMLParser:
    return LexborHTMLParser(decode_html(html, encoding) if isinstance(html, bytes) else html)


def robots_meta_flags(name: str | None, content: str | None) -> tuple[bool, bool]:
    """(opts out, nofollow) for one ``<meta name content>``: name robots|altforge, noai / noimageai / nofollow."""
    if (name or "").strip().lower() not in OPT_OUT_META_NAMES:
        return False, False
    tokens = {t.strip() for t in (content or "").lower().replace(" ", ",").split(",")}
    return bool(tokens & OPT_OUT_DIRECTIVES), bool(tokens & {"nofollow", "none"})


def _robots_meta(tree: LexborHTMLParser) -> tuple[bool, bool]:
    """(opted out, nofollow) over all ``<meta name>`` tags of a page."""
    opted_out = nofollow = False
    for node in tree.css("meta[name]"):
        out, nof = robots_meta_flags(node.attributes.get("name"), node.attributes.get("content"))
        opted_out, nofollow = opted_out or out, nofollow or nof
    return opted_out, nofollow


def _base_url(tree: LexborHTMLParser, page_url: str) -> str:
    """The first ``<base href>`` resolved against the page URL, else the page URL."""
    node = tree.css_first("base[href]")
    base = resolve_url(node.attributes.get("href"), page_url) if node is not None else None
    return base or page_url


def _links(tree: LexborHTMLParser, base: str) -> list[str]:
    links: dict[str, None] = {}
    for node in tree.css("a[href], area[href]"):
        url = resolve_url(node.attributes.get("href"), base)
        if url is not None:
            links.setdefault(url, None)
    return list(links)


def extract_page(
    html: bytes | str,
    page_url: str,
    *,
    encoding: str | None = None,
    drops: Counter,
    cfg: ExtractConfig = ExtractConfig(),
    opted_out: bool = False,
) -> Page:
    """Parse a page once: its image records (drops counted), links and robots meta flags.

    ``opted_out=True`` says the HTTP response already opted out (X-Robots-Tag): every image is ``page_opt_out``.
    """
    tree = _tree(html, encoding)
    meta_out, nofollow = _robots_meta(tree)
    opted_out = opted_out or meta_out
    base = _base_url(tree, page_url)
    imgs = tree.css("img")
    records: list[Record] = []
    if opted_out:
        drops["page_opt_out"] += len(imgs)
    else:
        seen = SeenPairs()
        for node in imgs:
            attrs = node.attributes
            rec = image_record(_img_sources(attrs), attrs.get("alt"), base, page_url, cfg, drops, seen)
            if rec is not None:
                records.append(rec)
    return Page(records=records, links=_links(tree, base), opted_out=opted_out, nofollow=nofollow)


def extract_images(
    html: bytes | str,
    page_url: str,
    *,
    encoding: str | None = None,
    drops: Counter,
    cfg: ExtractConfig = ExtractConfig(),
) -> list[Record]:
    """The page's image records in document order; every image not kept is counted in ``drops``."""
    return extract_page(html, page_url, encoding=encoding, drops=drops, cfg=cfg).records


def extract_links(html: bytes | str, page_url: str, *, encoding: str | None = None) -> list[str]:
    """Absolute http(s) ``a[href]`` / ``area[href]`` targets, fragments stripped, first-seen order."""
    tree = _tree(html, encoding)
    return _links(tree, _base_url(tree, page_url))


def page_opts_out(html: bytes | str, *, encoding: str | None = None) -> bool:
    """True if ``<meta name="robots">`` (or ``name="altforge"``) says noai or noimageai."""
    return _robots_meta(_tree(html, encoding))[0]
