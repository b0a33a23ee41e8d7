"""Image records from web archives: WARC response records (HTML parsed here) and Common Crawl WAT metadata.

One reader takes both: WARC ``response`` / ``resource`` records with an HTML payload go through
:func:`pipeline.sources.html.extract_page`; WAT ``metadata`` records (JSON) give their ``IMG@/src`` links with
alt text directly. Files open through fsspec (local paths, ``s3://``, ...); gzip is recognised by its first
bytes, whatever the name.
Old ARC files are not read (counted as ``warc_bad_record``).

Counted in ``drops`` besides the per-image reasons of ``html.py`` (and ``duplicate`` across one file's pages):
``not_html`` (a response that is not an HTML page), ``page_http_<code>`` (a response other than 200 or 203, as a
live fetch counts them), ``page_opt_out`` (per image, meta robots or X-Robots-Tag noai / noimageai),
``warc_bad_record`` (a record that cannot be read: skipped; or a corrupt stream: reading stops), ``warc_truncated``
(the file ends early: the records read so far are kept, the cut record is dropped).
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections import Counter
from collections.abc import Iterator

import fsspec
from warcio.archiveiterator import ArchiveIterator
from warcio.exceptions import ArchiveLoadFailed

from pipeline.fetch import OK_CODES
from pipeline.robots import opt_out
from pipeline.sources.html import (
    ExtractConfig,
    charset_from_content_type,
    extract_page,
    image_record,
    resolve_url,
    robots_meta_flags,
    unescape_attribute,
)
from pipeline.sources.records import Record, SeenPairs, guarded_options, refusals_as_errors

HTML_TYPES = ("text/html", "application/xhtml+xml")
WAT_IMAGE_PATH = "IMG@/src"
READ_BYTES = 1 << 16  # bytes per read when draining a record
GZIP_MAGIC = b"\x1f\x8b"


class _EOFWatch:
    """A read-only stream wrapper that turns a truncated gzip's EOFError into end-of-data and remembers it.

    warcio swallows EOFError, which would make a cut file look complete.
    """

    def __init__(self, fh):
        self.fh = fh
        self.truncated = False
        # a GzipFile's read(n) gathers several members' data and loses it all when the last one is cut; read1
        # returns what one read of the compressed stream gave, so everything before the cut is delivered
        self._read = getattr(fh, "read1", fh.read)

    def read(self, size: int = -1) -> bytes:
        if self.truncated:
            return b""
        try:
            return self._read(size)
        except EOFError:
            self.truncated = True
            return b""


def _media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def _http_status(record) -> int | None:
    try:
        return int(record.http_headers.get_statuscode())
    except (AttributeError, TypeError, ValueError):
        return None


def _warc_page(record, drops: Counter, cfg: ExtractConfig, seen: SeenPairs) -> list[Record]:
    """The image records of one WARC response/resource record (its payload already checked to be HTML)."""
    page_url = record.rec_headers.get_header("WARC-Target-URI")
    if record.rec_type == "response":
        ctype_header = record.http_headers.get_header("Content-Type")
        header_opt_out = opt_out(v for k, v in record.http_headers.headers if k.lower() == "x-robots-tag")
    else:
        ctype_header = record.rec_headers.get_header("Content-Type")
        header_opt_out = False
    body = record.content_stream().read()
    page = extract_page(
        body,
        page_url,
        encoding=charset_from_content_type(ctype_header),
        drops=drops,
        cfg=cfg,
        opted_out=header_opt_out,
    )
    return _cross_page_dedup(page.records, drops, seen)


def _cross_page_dedup(records: list[Record], drops: Counter, seen: SeenPairs) -> list[Record]:
    out = []
    for rec in records:
        if seen.first_time(rec.url, rec.caption):
            out.append(rec)
        else:
            drops["duplicate"] += 1
    return out


def wat_records(meta: dict, drops: Counter, cfg: ExtractConfig, seen: SeenPairs) -> list[Record]:
    """The image records of one WAT JSON object (Common Crawl layout); KeyError/TypeError if malformed."""
    envelope = meta["Envelope"]
    header = envelope["WARC-Header-Metadata"]
    if header.get("WARC-Type") != "response":
        return []  # request / metadata / warcinfo records describe no page
    http = envelope["Payload-Metadata"].get("HTTP-Response-Metadata")
    if http is None:
        drops["not_html"] += 1
        return []
    status = str(http.get("Response-Message", {}).get("Status", "200")).strip()
    if not (status.isdigit() and int(status) in OK_CODES):
        drops[f"page_http_{status}"] += 1
        return []
    html_meta = http.get("HTML-Metadata")
    if html_meta is None:
        drops["not_html"] += 1
        return []
    page_url = header["WARC-Target-URI"]
    head = html_meta.get("Head") or {}
    base = resolve_url(unescape_attribute(head["Base"]), page_url) if head.get("Base") else None
    base = base or page_url
    headers = http.get("Headers") or {}
    opted_out = opt_out(str(v) for k, v in headers.items() if k.lower() == "x-robots-tag")
    for m in head.get("Metas") or ():
        opted_out = opted_out or robots_meta_flags(m.get("name"), m.get("content"))[0]
    images = [link for link in html_meta.get("Links") or () if link.get("path") == WAT_IMAGE_PATH]
    if opted_out:
        drops["page_opt_out"] += len(images)
        return []
    records, page_seen = [], SeenPairs()
    for link in images:
        # WAT keeps attribute values as written, so entities are decoded here, by the HTML parser's rules for
        # attributes (which decode a WARC page's), so the same page gives the same records either way.
        src = unescape_attribute(link.get("url") or "")
        alt = unescape_attribute(link["alt"]) if link.get("alt") is not None else None
        rec = image_record([src] if src else [], alt, base, page_url, cfg, drops, page_seen)
        if rec is not None:
            records.append(rec)
    return _cross_page_dedup(records, drops, seen)


def _records_of(record, drops: Counter, cfg: ExtractConfig, seen: SeenPairs) -> list[Record]:
    """Dispatch one archive record: HTML response/resource, WAT metadata, or nothing (request, warcinfo...)."""
    rec_type = record.rec_type
    warc_ctype = _media_type(record.rec_headers.get_header("Content-Type"))
    if rec_type == "metadata" and warc_ctype == "application/json":
        return wat_records(json.loads(record.content_stream().read()), drops, cfg, seen)
    if rec_type == "response" and record.http_headers is not None:
        status = _http_status(record)
        if status is not None and status not in OK_CODES:  # a 204 or 206 body is no whole page either
            drops[f"page_http_{status}"] += 1
            return []
        if _media_type(record.http_headers.get_header("Content-Type")) not in HTML_TYPES:
            drops["not_html"] += 1
            return []
        return _warc_page(record, drops, cfg, seen)
    if rec_type == "resource":
        if warc_ctype not in HTML_TYPES:
            drops["not_html"] += 1
            return []
        return _warc_page(record, drops, cfg, seen)
    if rec_type == "response":  # a response record without HTTP headers (not http:// or https://)
        drops["not_html"] += 1
    return []


def iter_warc(
    path_or_url: str,
    drops: Counter,
    *,
    cfg: ExtractConfig = ExtractConfig(),
    storage_options: dict | None = None,
    allow_private: bool = False,
) -> Iterator[Record]:
    """Yield the image records of a ``.warc[.gz]`` or ``.wat[.gz]`` file (a local path or any fsspec URL; an
    http(s) one is read under the fetcher's address rules, ``allow_private`` as ``--allow-private-network``)."""
    opts = guarded_options(path_or_url, storage_options, allow_private)
    with refusals_as_errors(path_or_url):
        yield from _read_warc(path_or_url, drops, cfg, opts)


def _read_warc(path_or_url: str, drops: Counter, cfg: ExtractConfig, opts: dict) -> Iterator[Record]:
    seen = SeenPairs()
    with fsspec.open(path_or_url, "rb", **opts) as raw:
        gzipped = raw.read(2) == GZIP_MAGIC  # by content, not name: a signed URL's query hides its ".gz"
        raw.seek(0)
        # decompressed here, not inside warcio, so that a cut gzip member reaches _EOFWatch and is counted
        fh = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw
        stream = _EOFWatch(fh)
        records = iter(ArchiveIterator(stream, check_digests=False))
        while True:
            try:
                record = next(records)
            except StopIteration:
                break
            except (ArchiveLoadFailed, OSError, zlib.error, ValueError):  # a corrupt stream: cannot resync
                drops["warc_bad_record"] += 1
                break
            if record.format != "warc":  # warcio reads anything else as old ARC, which we do not take
                drops["warc_bad_record"] += 1
                break
            rec_drops: Counter = Counter()  # merged only if the record turns out complete
            try:
                out = _records_of(record, rec_drops, cfg, seen)
            except (ValueError, KeyError, TypeError, AttributeError, LookupError, UnicodeError, zlib.error, OSError):
                out = None
            except RecursionError:  # WAT JSON nested deeper than the interpreter's limit
                out = None
            while record.raw_stream.read(READ_BYTES):  # drain, so a short record shows in its byte count
                pass
            if getattr(record.raw_stream, "limit", 0) > 0:  # the file ends inside this record
                drops["warc_truncated"] += 1
                return
            if out is None:
                drops["warc_bad_record"] += 1
                continue
            drops.update(rec_drops)
            yield from out
        if stream.truncated:
            drops["warc_truncated"] += 1
