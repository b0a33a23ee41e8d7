"""WARC and WAT reading: archives written with warcio in the test, local and on a loopback S3 server."""

import io
import json
from collections import Counter

import fsspec
import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from pipeline.sources.warc import iter_warc


def _response(writer, uri, body: bytes, ctype="text/html; charset=utf-8", status="200 OK", headers=()):
    http = StatusAndHeaders(status, [("Content-Type", ctype), *headers], protocol="HTTP/1.1")
    writer.write_record(writer.create_warc_record(uri, "response", payload=io.BytesIO(body), http_headers=http))


def _html(body: str, head: str = "", encoding: str = "utf-8") -> bytes:
    return f"<html><head>{head}</head><body>{body}</body></html>".encode(encoding)


def _write_warc(path, gz: bool = True) -> None:
    """warcinfo, request, 3 HTML pages with images, an image, a noai page, a 404, a cp1252 page."""
    with open(path, "wb") as fh:
        w = WARCWriter(fh, gzip=gz)
        w.write_record(w.create_warcinfo_record("test.warc", {"software": "test"}))
        req = StatusAndHeaders("GET / HTTP/1.1", [("Host", "site.example")], is_http_request=True)
        w.write_record(w.create_warc_record("https://site.example/", "request", http_headers=req))
        _response(
            w,
            "https://site.example/",
            _html('<img src="/a.jpg" alt="An apple on a table"><img src="b.jpg" alt="image"><a href="/x">x</a>'),
        )
        _response(w, "https://site.example/pic.jpg", b"\xff\xd8\xff\xe0 jpeg bytes", ctype="image/jpeg")
        _response(
            w,
            "https://site.example/blog/post.html",
            _html(
                '<img src="../c.jpg" alt="Crème brûlée – €5"><img src="/a.jpg" alt="An apple on a table">',
                encoding="cp1252",
            ),
            ctype="text/html; charset=windows-1252",
        )
        _response(
            w,
            "https://site.example/noai.html",
            _html(
                '<img src="/n1.jpg" alt="not for training"><img src="/n2.jpg" alt="nor this one">',
                '<meta name="robots" content="noai">',
            ),
        )
        _response(
            w,
            "https://site.example/gone.html",
            _html('<img src="/g.jpg" alt="a gone page image">'),
            status="404 Not Found",
        )
        _response(
            w,
            "https://other.example/p",
            _html(
                '<base href="https://cdn.other.example/"><img srcset="s.jpg 1x, l.jpg 2x" alt="A kite in the wind">'
            ),
            headers=[("X-Robots-Tag", "otherbot: noai")],
        )
        _response(
            w,
            "https://site.example/legacy.html",
            _html('<img src="/e.jpg" alt="Déjà vu in Zürich">', '<meta charset="iso-8859-1">', encoding="cp1252"),
            ctype="text/html",
        )
        _response(
            w,
            "https://site.example/tagged.html",
            _html('<img src="/t.jpg" alt="tagged by the header">'),
            headers=[("X-Robots-Tag", "altforge: noimageai")],
        )


def _write_wat(path) -> None:
    def meta(uri, html_meta=None, status="200", wtype="response", headers=None):
        payload = {"Actual-Content-Type": "application/http; msgtype=response"}
        if wtype == "response":
            http = {"Response-Message": {"Status": status}, "Headers": headers or {}}
            if html_meta is not None:
                http["HTML-Metadata"] = html_meta
            payload["HTTP-Response-Metadata"] = http
        return {
            "Envelope": {
                "Format": "WARC",
                "WARC-Header-Metadata": {"WARC-Type": wtype, "WARC-Target-URI": uri},
                "Payload-Metadata": payload,
            }
        }

    objs = [
        meta("https://w.example/", wtype="request"),
        meta(
            "https://w.example/dir/page",
            {
                "Head": {"Title": "t", "Base": "https://static.w.example/base/"},
                "Links": [
                    {"path": "A@/href", "url": "/other"},
                    {"path": "IMG@/src", "url": "tree.jpg", "alt": "A tall oak tree"},
                    {"path": "IMG@/src", "url": "/abs.png", "alt": "Fish &amp; chips"},
                    {"path": "IMG@/src", "url": "noalt.jpg"},
                    {"path": "IMG@/src", "url": "data:image/png;base64,AAA", "alt": "inline data"},
                    {"path": "IMG@/src", "url": "tree.jpg", "alt": "A tall oak tree"},
                ],
            },
        ),
        meta("https://w.example/file.pdf"),  # no HTML-Metadata: not a page
        meta(
            "https://w.example/optout",
            {
                "Head": {"Metas": [{"name": "robots", "content": "noimageai"}]},
                "Links": [{"path": "IMG@/src", "url": "o.jpg", "alt": "an opted out one"}],
            },
        ),
        meta(
            "https://w.example/hdr",
            {"Links": [{"path": "IMG@/src", "url": "h.jpg", "alt": "header opt out"}]},
            headers={"X-Robots-Tag": "noai"},
        ),
        meta("https://w.example/missing", {"Links": []}, status="404"),
        meta(
            "https://w.example/rel",
            {"Links": [{"path": "IMG@/src", "url": "//cdn.w.example/r.jpg", "alt": "Sunset over the bay"}]},
        ),
    ]
    with open(path, "wb") as fh:
        w = WARCWriter(fh, gzip=str(path).endswith(".gz"))
        for i, obj in enumerate(objs):
            payload = json.dumps(obj).encode()
            if i == 3:  # a corrupt record before the opt-out page: skipped, counted, reading goes on
                w.write_record(
                    w.create_warc_record(
                        "https://w.example/broken",
                        "metadata",
                        payload=io.BytesIO(b'{"Envelope": {'),
                        warc_content_type="application/json",
                    )
                )
            w.write_record(
                w.create_warc_record(
                    obj["Envelope"]["WARC-Header-Metadata"]["WARC-Target-URI"],
                    "metadata",
                    payload=io.BytesIO(payload),
                    warc_content_type="application/json",
                )
            )


@pytest.mark.parametrize("name", ["crawl.warc.gz", "crawl.warc"])
def test_warc_response_records(tmp_path, name):
    path = tmp_path / name
    _write_warc(path, gz=name.endswith(".gz"))
    drops = Counter()
    recs = list(iter_warc(str(path), drops))
    assert [(r.url, r.caption, r.page_url) for r in recs] == [
        ("https://site.example/a.jpg", "An apple on a table", "https://site.example/"),
        ("https://site.example/c.jpg", "Crème brûlée – €5", "https://site.example/blog/post.html"),
        ("https://cdn.other.example/l.jpg", "A kite in the wind", "https://other.example/p"),
        ("https://site.example/e.jpg", "Déjà vu in Zürich", "https://site.example/legacy.html"),
    ]
    assert drops == Counter(
        {"placeholder_alt": 1, "not_html": 1, "duplicate": 1, "page_opt_out": 3, "page_http_404": 1}
    )


@pytest.mark.parametrize("name", ["crawl.wat.gz", "crawl.wat"])
def test_wat_metadata_records(tmp_path, name):
    path = tmp_path / name
    _write_wat(path)
    drops = Counter()
    recs = list(iter_warc(str(path), drops))
    assert [(r.url, r.caption, r.page_url) for r in recs] == [
        ("https://static.w.example/base/tree.jpg", "A tall oak tree", "https://w.example/dir/page"),
        ("https://static.w.example/abs.png", "Fish & chips", "https://w.example/dir/page"),
        ("https://cdn.w.example/r.jpg", "Sunset over the bay", "https://w.example/rel"),
    ]
    assert drops == Counter(
        {
            "no_alt": 1,
            "bad_url": 1,
            "duplicate": 1,
            "not_html": 1,
            "warc_bad_record": 1,
            "page_opt_out": 2,
            "page_http_404": 1,
        }
    )


@pytest.mark.parametrize("name", ["cut.warc.gz", "cut.warc", "cut.wat.gz"])
def test_truncated_file_keeps_records_so_far(tmp_path, name):
    full = tmp_path / ("full." + name.split(".", 1)[1])
    (_write_wat if ".wat" in name else _write_warc)(full)
    complete = list(iter_warc(str(full), Counter()))
    data = full.read_bytes()
    for cut_at in (len(data) - 30, len(data) * 2 // 3):
        path = tmp_path / name
        path.write_bytes(data[:cut_at])
        drops = Counter()
        recs = list(iter_warc(str(path), drops))
        assert drops["warc_truncated"] == 1
        assert recs == complete[: len(recs)]
        assert len(recs) < len(complete) or cut_at == len(data) - 30


def test_garbage_file_counts_a_bad_record(tmp_path):
    path = tmp_path / "junk.warc"
    path.write_bytes(b"this is not a WARC file at all\r\n\r\n")
    drops = Counter()
    assert list(iter_warc(str(path), drops)) == []
    assert drops == Counter({"warc_bad_record": 1})


def test_warc_from_s3(tmp_path, s3_bucket):
    prefix, opts = s3_bucket
    local = tmp_path / "s.warc.gz"
    _write_warc(local)
    with fsspec.open(f"{prefix}/in/s.warc.gz", "wb", **opts) as fh:
        fh.write(local.read_bytes())
    drops = Counter()
    recs = list(iter_warc(f"{prefix}/in/s.warc.gz", drops, storage_options=opts))
    assert recs == list(iter_warc(str(local), Counter()))
    assert len(recs) == 4 and drops["not_html"] == 1


def test_recipe_sources_on_s3_get_the_storage_options(tmp_path, s3_bucket):
    """The plan reads recipe sources with the recipe's storage_options (an S3 endpoint of one's own), not the
    default endpoint: a URL list and a WARC archive in the loopback bucket."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.plan import source_records
    from pipeline.recipe import parse_source

    prefix, opts = s3_bucket
    _write_warc(tmp_path / "s.warc.gz")
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a red kite"]}), tmp_path / "l.parquet")
    fs = fsspec.filesystem("s3", **opts)
    fs.put(str(tmp_path / "s.warc.gz"), f"{prefix}/in/s.warc.gz")
    fs.put(str(tmp_path / "l.parquet"), f"{prefix}/in/l.parquet")
    warc = parse_source({"kind": "warc", "paths": [f"{prefix}/in/s.warc.gz"]})
    urls = parse_source({"kind": "url_list", "path": f"{prefix}/in/l.parquet"})
    drops = Counter()
    assert len(list(source_records(warc, None, drops, opts))) == 4
    assert [r.caption for r in source_records(urls, None, drops, opts)] == ["a red kite"]


def test_wat_record_nested_too_deeply_is_a_bad_record(tmp_path):
    path = tmp_path / "deep.wat"
    good = {
        "Envelope": {
            "WARC-Header-Metadata": {"WARC-Type": "response", "WARC-Target-URI": "https://w.example/p"},
            "Payload-Metadata": {
                "HTTP-Response-Metadata": {
                    "HTML-Metadata": {"Links": [{"path": "IMG@/src", "url": "a.jpg", "alt": "A boat at sea"}]}
                }
            },
        }
    }
    with open(path, "wb") as fh:
        w = WARCWriter(fh, gzip=False)
        for payload in (b"[" * 100_000 + b"]" * 100_000, json.dumps(good).encode()):
            rec = w.create_warc_record(
                "https://w.example/p", "metadata", payload=io.BytesIO(payload), warc_content_type="application/json"
            )
            w.write_record(rec)
    drops = Counter()
    assert [r.url for r in iter_warc(str(path), drops)] == ["https://w.example/a.jpg"]
    assert drops == Counter({"warc_bad_record": 1})


@pytest.mark.parametrize("name", ["cut.warc", "cut.bin"])  # gzip that no name announces (a signed URL's query)
def test_a_cut_gzip_member_is_counted_and_the_records_before_it_kept_whatever_the_name(tmp_path, name):
    import gzip

    members = []  # one gzip member per record, as Common Crawl writes them
    for i in range(4):
        buf = io.BytesIO()
        _response(
            WARCWriter(buf, gzip=False), f"https://g.example/{i}", _html(f'<img src="/i{i}.jpg" alt="photo {i} x">')
        )
        members.append(gzip.compress(buf.getvalue()))
    data = b"".join(members)
    for cut, kept in ((len(data) - len(members[-1]) // 2, 3), (len(members[0]) + len(members[1]) // 2, 1)):
        path = tmp_path / name
        path.write_bytes(data[:cut])
        drops = Counter()
        recs = list(iter_warc(str(path), drops))
        assert [r.url for r in recs] == [f"https://g.example/i{i}.jpg" for i in range(kept)]
        assert drops == Counter({"warc_truncated": 1})
    (tmp_path / name).write_bytes(data)
    assert len(list(iter_warc(str(tmp_path / name), Counter()))) == 4


def test_wat_attribute_values_decode_like_the_html_parser_decodes_a_warc_page():
    from pipeline.sources.html import ExtractConfig, extract_page
    from pipeline.sources.records import SeenPairs
    from pipeline.sources.warc import wat_records

    src, alt = (
        "/img/p.jpg?size=large&region=eu&current=1&amp;q=2",
        "Logo &copy2023 of Tom&Jerry &amp; &eacute;t&eacute",
    )
    links = [{"path": "IMG@/src", "url": src, "alt": alt}]
    http = {"Response-Message": {"Status": "200"}, "Headers": {}, "HTML-Metadata": {"Head": {}, "Links": links}}
    header = {"WARC-Type": "response", "WARC-Target-URI": "http://w.example/p"}
    meta = {"Envelope": {"WARC-Header-Metadata": header, "Payload-Metadata": {"HTTP-Response-Metadata": http}}}
    wat = [(r.url, r.caption) for r in wat_records(meta, Counter(), ExtractConfig(), SeenPairs())]
    page = extract_page(f'<img src="{src}" alt="{alt}">', "http://w.example/p", drops=Counter())
    assert (
        wat
        == [(r.url, r.caption) for r in page.records]
        == [("http://w.example/img/p.jpg?size=large&region=eu&current=1&q=2", "Logo &copy2023 of Tom&Jerry & été")]
    )


def test_a_partial_or_empty_response_is_no_page(tmp_path):
    path = tmp_path / "partial.warc.gz"
    with open(path, "wb") as fh:
        w = WARCWriter(fh, gzip=True)
        page = _html('<img src="/p.jpg" alt="A pear in a bowl">')
        _response(w, "https://site.example/part", page[: len(page) // 2], status="206 Partial Content")
        _response(w, "https://site.example/none", b"", status="204 No Content")
        _response(w, "https://site.example/proxy", page, status="203 Non-Authoritative Information")
    drops = Counter()
    recs = list(iter_warc(str(path), drops))
    assert [(r.url, r.page_url) for r in recs] == [("https://site.example/p.jpg", "https://site.example/proxy")]
    assert drops == Counter({"page_http_206": 1, "page_http_204": 1})
