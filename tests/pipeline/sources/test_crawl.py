"""The crawler end to end against a real loopback web site, through the real Fetcher."""

import asyncio
import codecs
import dataclasses
import gzip
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from unittest.mock import ANY

import pytest

from pipeline.fetch import FetchConfig, Fetcher
from pipeline.robots import opt_out
from pipeline.sources.crawl import CrawlConfig, crawl, header_nofollow, normalize_url, parse_sitemap

SITEMAP_NS = 'xmlns="http://www.sitemaps.org/schemas/sitemap/0.9"'


def _page(body: str, head: str = "") -> tuple[str, bytes]:
    return "text/html; charset=utf-8", f"<html><head>{head}</head><body>{body}</body></html>".encode()


def _site(origin: str) -> dict[str, tuple[str, bytes]]:
    """path -> (content type, body) of a small site: 3 link levels, robots, sitemaps, off-site links."""
    index = _page(
        '<img src="/img/cat.jpg" alt="A grey cat on a sofa">'
        '<img src="/img/logo.png" alt="logo">'
        '<a href="/a.html">a</a> <a href="/private/secret.html">secret</a>'
        '<a href="http://offsite.invalid/page.html">off</a> <a href="https://www.offsite.invalid/">off2</a>'
        '<a href="/doc.pdf">pdf</a> <a href="/missing.html">404</a> <a href="/#top">self</a>'
        f'<a href="{origin.upper()}/a.html#frag">same page other spelling</a>'
    )
    return {
        "/robots.txt": (
            "text/plain",
            f"User-agent: *\nDisallow: /private/\nSitemap: {origin}/sitemap_index.xml\n".encode(),
        ),
        "/sitemap_index.xml": (
            "application/xml",
            f"<sitemapindex {SITEMAP_NS}><sitemap><loc>{origin}/sitemap-pages.xml.gz</loc></sitemap>"
            f"<sitemap><loc>http://offsite.invalid/sitemap.xml</loc></sitemap></sitemapindex>".encode(),
        ),
        "/sitemap-pages.xml.gz": (
            "application/gzip",
            gzip.compress(
                f"<urlset {SITEMAP_NS}><url><loc>{origin}/orphan.html</loc></url>"
                f"<url><loc>{origin}/a.html</loc></url></urlset>".encode()
            ),
        ),
        "/": index,
        "/a.html": _page(
            '<img src="/img/cat.jpg" alt="A grey cat on a sofa">'  # same pair as on / -> duplicate
            '<img src="img/dog.jpg" alt="A dog running on the beach">'
            '<a href="b.html">b</a> <a href="http://offsite.invalid/page.html">off again</a>'
        ),
        "/b.html": _page(
            '<img src="/img/b1.jpg" alt="first opted out image"><img src="/img/b2.jpg" alt="second opted out image">'
            '<a href="/c.html">c</a>',
            head='<meta name="robots" content="NoAI, noimageai">',
        ),
        "/c.html": _page('<img src="/img/c.jpg" alt="A deep page picture of hills">'),
        "/orphan.html": _page('<img src="/img/orphan.jpg" alt="Only the sitemap knows me">'),
        "/private/secret.html": _page('<img src="/img/secret.jpg" alt="Never to be seen">'),
        "/doc.pdf": ("application/pdf", b"%PDF-1.4 not a page"),
    }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 (http.server naming)
        self.server.requests.append(self.path)
        entry = self.server.pages.get(self.path.split("#", 1)[0])
        status, (ctype, body) = (200, entry) if entry else (404, ("text/plain", b"not found"))
        status = self.server.statuses.get(self.path, status)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for name, value in self.server.extra_headers.get(self.path, {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def site():
    """A threaded HTTP server on 127.0.0.1 serving :func:`_site`; yields (origin, requested paths)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    origin = f"http://127.0.0.1:{server.server_address[1]}"
    server.pages, server.requests, server.extra_headers, server.statuses = _site(origin), [], {}, {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield origin, server.requests, server
    server.shutdown()
    server.server_close()


class _RecordingFetcher:
    """Passes every call to the real Fetcher and remembers the URLs asked for (not a fake: it does no I/O itself)."""

    def __init__(self, inner: Fetcher):
        self.inner, self.asked = inner, []

    async def fetch(self, url, kind="image"):
        self.asked.append((url, kind))
        return await self.inner.fetch(url, kind)

    async def robots_allowed(self, url):
        return await self.inner.robots_allowed(url)


class _PageBodyOnOptOut(_RecordingFetcher):
    """The real Fetcher, its X-Robots-Tag opt-out applied here to pages as the crawl expects: the body kept."""

    async def fetch(self, url, kind="image"):
        result = await super().fetch(url, kind)
        if kind == "page" and result.ok and opt_out([result.headers.get("x-robots-tag", "")]):
            result.status = "opt_out"
        return result


def _run(seeds, cfg, wrapper=_RecordingFetcher) -> tuple[list, Counter, list]:
    async def go():
        drops = Counter()
        fcfg = FetchConfig(allow_private_network=True, retries=0, connect_timeout=2, total_timeout=5)
        if wrapper is _PageBodyOnOptOut:
            fcfg = dataclasses.replace(fcfg, respect_opt_out=False)
        async with Fetcher(fcfg) as real:
            fetcher = wrapper(real)
            records = [r async for r in crawl(seeds, cfg, fetcher, drops)]
        return records, drops, fetcher.asked

    return asyncio.run(go())


def test_crawl_end_to_end(site):
    origin, requests, _ = site
    records, drops, asked = _run([origin + "/"], CrawlConfig(concurrency=4))
    got = [(r.url.removeprefix(origin), r.caption, r.page_url.removeprefix(origin)) for r in records]
    assert got == [
        ("/img/cat.jpg", "A grey cat on a sofa", "/"),
        ("/img/dog.jpg", "A dog running on the beach", "/a.html"),
        ("/img/orphan.jpg", "Only the sitemap knows me", "/orphan.html"),
        ("/img/c.jpg", "A deep page picture of hills", "/c.html"),
    ]
    assert drops["placeholder_alt"] == 1
    assert drops["duplicate"] == 1
    assert drops["page_opt_out"] == 2  # both images of b.html
    assert drops["page_robots_disallowed"] == 1
    assert drops["not_html"] == 1
    assert drops["page_http_404"] == 1
    assert drops["offsite_link"] == 2  # two distinct off-site URLs, each counted once
    assert drops["offsite_sitemap"] == 1
    # Off-site URLs and robots-disallowed pages are never requested.
    assert not [u for u, _ in asked if ".invalid" in u]
    assert "/private/secret.html" not in requests
    # Every page is fetched once, the self-links and other spellings of a.html included.
    page_requests = [p for p in requests if p.endswith(".html") or p == "/"]
    assert sorted(page_requests) == sorted(["/", "/a.html", "/b.html", "/c.html", "/orphan.html", "/missing.html"])
    # The crawl is deterministic: a second run yields the same records in the same order.
    again, drops2, _ = _run([origin + "/"], CrawlConfig(concurrency=2))
    assert again == records and drops2 == drops


def test_depth_pages_and_sitemap_switches(site):
    origin, requests, _ = site
    records, drops, asked = _run([origin + "/"], CrawlConfig(max_depth=1, use_sitemaps=False))
    assert [r.url.removeprefix(origin) for r in records] == ["/img/cat.jpg", "/img/dog.jpg"]
    assert drops["max_depth_reached"] == 1  # b.html, found at depth 2
    assert not [u for u, _ in asked if "sitemap" in u or u.endswith("/robots.txt")]
    requests.clear()
    records, drops, _ = _run([origin + "/"], CrawlConfig(max_pages=2, use_sitemaps=False))
    assert [p for p in requests if p != "/robots.txt"] == ["/", "/a.html"]
    assert drops["max_pages_reached"] >= 3


def test_allowed_domains_exclude_the_seed_host_links(site):
    origin, requests, _ = site
    # The seed is fetched, but its links point at 127.0.0.1, which is not allowed: all off-site.
    records, drops, asked = _run([origin + "/"], CrawlConfig(allowed_domains=("example.org",), use_sitemaps=False))
    assert [r.page_url for r in records] == [origin + "/"]
    assert [u for u, kind in asked if kind == "page"] == [origin + "/"]
    assert drops["offsite_link"] >= 5


def test_offsite_redirect_and_header_opt_out(site):
    origin, requests, server = site
    port = server.server_address[1]
    # localhost is another host name than 127.0.0.1 (the allowed one), on the same loopback server.
    server.pages["/moved.html"] = ("text/html", b"moved")
    server.extra_headers["/moved.html"] = {"Location": f"http://localhost:{port}/c.html"}
    server.pages["/tagged.html"] = _page('<img src="/img/t.jpg" alt="tagged by header">')
    server.extra_headers["/tagged.html"] = {"X-Robots-Tag": "noimageai"}
    server.pages["/start.html"] = _page('<a href="/moved.html">m</a><a href="/tagged.html">t</a>')
    server.statuses["/moved.html"] = 301
    records, drops, _ = _run([origin + "/start.html"], CrawlConfig(use_sitemaps=False))
    assert records == []
    assert drops["page_offsite_redirect"] == 1
    assert drops["page_opt_out_header"] == 1


@pytest.mark.parametrize("wrapper", [_PageBodyOnOptOut, _RecordingFetcher])
def test_header_opt_out_page_is_treated_as_a_meta_one(site, wrapper):
    origin, requests, server = site
    server.pages["/hdr.html"] = _page('<img src="/img/h.jpg" alt="home picture of a cat"><a href="/c.html">c</a>')
    server.extra_headers["/hdr.html"] = {"X-Robots-Tag": "noai"}
    records, drops, _ = _run([origin + "/hdr.html"], CrawlConfig(use_sitemaps=False), wrapper)
    # Its images are dropped, its links followed: a noai home page does not hide the whole site.
    assert [r.url.removeprefix(origin) for r in records] == ["/img/c.jpg"]
    assert drops == Counter({"page_opt_out_header": 1, "page_opt_out": 1})
    server.extra_headers["/hdr.html"] = {"X-Robots-Tag": "noai, nofollow"}
    records, drops, _ = _run([origin + "/hdr.html"], CrawlConfig(use_sitemaps=False), wrapper)
    assert records == []
    assert drops == Counter({"page_opt_out_header": 1, "page_opt_out": 1, "page_nofollow": 1})


def test_header_nofollow_is_honoured_as_a_meta_one(site):
    origin, requests, server = site
    server.pages["/hdr.html"] = _page('<img src="/img/h.jpg" alt="home picture of a cat"><a href="/c.html">c</a>')
    server.extra_headers["/hdr.html"] = {"X-Robots-Tag": "otherbot: nofollow"}
    records, drops, _ = _run([origin + "/hdr.html"], CrawlConfig(use_sitemaps=False))
    assert [r.url.removeprefix(origin) for r in records] == ["/img/h.jpg", "/img/c.jpg"]
    server.extra_headers["/hdr.html"] = {"X-Robots-Tag": "unavailable_after: 1 Jan 2000 00:00:00 GMT, nofollow"}
    records, drops, _ = _run([origin + "/hdr.html"], CrawlConfig(use_sitemaps=False))
    assert [r.url.removeprefix(origin) for r in records] == ["/img/h.jpg"]
    assert drops == Counter({"page_nofollow": 1})
    assert header_nofollow("NONE") and header_nofollow("otherbot: noai, altforge: nofollow")
    assert not header_nofollow("noindex") and not header_nofollow(None) and not header_nofollow("googlebot: none")


def test_bad_seeds_fail_loudly():
    with pytest.raises(ValueError, match="seeds"):
        _run(["ftp://example.org/"], CrawlConfig())


def test_normalize_url():
    assert normalize_url("HTTP://Example.ORG:80/a?b=1#frag") == "http://example.org/a?b=1"
    assert normalize_url("https://example.org:443") == "https://example.org/"
    assert normalize_url("https://example.org:8443/x") == "https://example.org:8443/x"
    assert normalize_url("http://[::1]:8080/p") == "http://[::1]:8080/p"


def test_parse_sitemap_formats():
    urlset = (
        f'<urlset {SITEMAP_NS} xmlns:image="http://www.google.com/schemas/sitemap-image/1.1">'
        "<url><loc> https://e.org/a?x=1&amp;y=2 </loc><image:image><image:loc>https://e.org/i.jpg</image:loc>"
        "</image:image></url><url><loc>https://e.org/b</loc></url></urlset>"
    ).encode()
    assert parse_sitemap(urlset, 10_000) == ("urlset", ["https://e.org/a?x=1&y=2", "https://e.org/b"])
    assert parse_sitemap(gzip.compress(urlset), 10_000) == parse_sitemap(urlset, 10_000)
    assert parse_sitemap(b"https://e.org/1\n\nhttps://e.org/2\n", 100) == (
        "text",
        ["https://e.org/1", "https://e.org/2"],
    )
    with_bom = codecs.BOM_UTF8 + b'<?xml version="1.0" encoding="UTF-8"?>\n' + urlset  # as some CMSs write them
    assert parse_sitemap(with_bom, 10_000) == parse_sitemap(gzip.compress(with_bom), 10_000) == ("urlset", ANY)
    assert parse_sitemap(with_bom, 10_000)[1] == ["https://e.org/a?x=1&y=2", "https://e.org/b"]
    assert parse_sitemap(b"<urlset><url><loc>x</loc>", 100) is None  # malformed XML
    assert parse_sitemap(urlset, 50) is None  # over the size limit
    assert parse_sitemap(b"<html><body>not a sitemap</body></html>", 1000) is None


def test_crawl_config_round_trips_through_json():
    import json

    from pipeline.sources.html import ExtractConfig

    cfg = CrawlConfig(allowed_domains=("a.example", "b.example"), max_pages=5, extract=ExtractConfig(min_alt_chars=7))
    again = CrawlConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.extract.min_alt_chars == 7


def test_a_sitemap_with_a_byte_order_mark_and_a_text_sitemap_with_relative_lines(site):
    origin, requests, server = site
    xml = f"<urlset {SITEMAP_NS}><url><loc>{origin}/orphan.html</loc></url></urlset>"
    server.pages["/sitemap_index.xml"] = ("application/xml", codecs.BOM_UTF8 + b"<?xml version='1.0'?>" + xml.encode())
    records, drops, _ = _run([origin + "/c.html"], CrawlConfig(max_depth=1))
    assert [r.page_url.removeprefix(origin) for r in records] == ["/c.html", "/orphan.html"]
    assert not [p for p in requests if "<" in p or "%3C" in p]  # no XML line fetched as a relative URL
    server.pages["/sitemap_index.xml"] = ("text/plain", f"{origin}/orphan.html\nc.html\n/a.html\n".encode())
    records, drops, _ = _run([origin + "/c.html"], CrawlConfig(max_depth=1))
    assert [r.page_url.removeprefix(origin) for r in records] == ["/c.html", "/orphan.html"]
    assert drops["sitemap_bad_url"] == 2  # a text sitemap's lines must be absolute URLs
