"""A polite breadth-first crawl of a few web sites that yields the image records of their pages.

The ``fetcher`` is a :class:`pipeline.fetch.Fetcher` (already entered): it applies robots.txt, the X-Robots-Tag
opt-out and the address guard to every page request. The crawl adds the site boundary, depth and page budgets,
sitemaps and the page-level ``<meta name="robots">`` opt-out. An X-Robots-Tag noai page is treated as a meta noai
one: its images are dropped, its links followed (when the fetcher hands over its body), unless a ``nofollow`` in
the meta tags or the X-Robots-Tag header says otherwise. Counters added to ``drops``:

- per page: ``page_<status>`` for failed fetches (``page_robots_disallowed``, ``page_http_404``, ...),
  ``page_opt_out_header`` (X-Robots-Tag noai / noimageai), ``not_html``, ``page_offsite_redirect``,
  ``page_parse_error``, ``page_nofollow`` (links not followed);
- per unique URL not fetched: ``offsite_link``, ``max_depth_reached``, ``max_pages_reached``;
- per sitemap file: ``sitemap_<status>``, ``sitemap_invalid``, ``offsite_sitemap``, ``sitemap_not_fetched``;
  per sitemap entry: ``sitemap_bad_url`` (not an http(s) URL);
- per image: everything :func:`pipeline.sources.html.extract_page` counts, and ``duplicate`` across pages.
"""

from __future__ import annotations

import asyncio
import codecs
import gzip
import io
import zlib
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, replace
from urllib.parse import urlsplit, urlunsplit
from xml.etree import ElementTree

from pipeline.robots import AGENT_TOKEN, header_says
from pipeline.sources.html import ExtractConfig, Page, charset_from_content_type, extract_page, resolve_url
from pipeline.sources.records import Record, SeenPairs

NOFOLLOW_DIRECTIVES = frozenset({"nofollow", "none"})  # X-Robots-Tag values that stop link-following

HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
DEFAULT_PORTS = {"http": 80, "https": 443}
WINDOW_FACTOR = 4  # pages started ahead of the one being yielded, as a multiple of ``concurrency``


@dataclass(frozen=True)
class CrawlConfig:
    """Where the crawl may go and how far."""

    allowed_domains: tuple[str, ...] = ()  # host names to stay on; empty = the seeds' hosts
    include_subdomains: bool = False  # also crawl sub.example.com when example.com is allowed
    follow_offsite: bool = False  # also fetch pages outside allowed_domains (still bounded by the budgets)
    max_pages: int = 10_000  # page fetches at most, seeds and failures included
    max_depth: int = 10  # link hops from a seed; sitemap URLs count as depth 1
    concurrency: int = 16  # page fetches in flight
    use_sitemaps: bool = True  # read the Sitemap: lines of robots.txt (else /sitemap.xml) of each seed origin
    max_sitemaps: int = 50  # sitemap files fetched at most, indexes included
    max_sitemap_bytes: int = 50_000_000  # bytes after gunzip (the sitemaps.org limit)
    extract: ExtractConfig = field(default_factory=ExtractConfig)

    @classmethod
    def from_dict(cls, d: dict) -> CrawlConfig:
        """Inverse of ``dataclasses.asdict`` (after a JSON round trip)."""
        d = dict(d)
        d["allowed_domains"] = tuple(d.get("allowed_domains", ()))
        d["extract"] = ExtractConfig(**d.get("extract", {}))
        return cls(**d)

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


def normalize_url(url: str) -> str:
    """The visited-set form of a URL: lower-case scheme and host, no default port, no fragment, path "/" if empty."""
    p = urlsplit(url)
    scheme, host = p.scheme.lower(), (p.hostname or "")
    netloc = f"[{host}]" if ":" in host else host
    if p.port is not None and p.port != DEFAULT_PORTS.get(scheme):
        netloc += f":{p.port}"
    return urlunsplit((scheme, netloc, p.path or "/", p.query, ""))


def _host(url: str) -> str:
    return urlsplit(url).hostname or ""


def _is_http(url: str) -> bool:
    return url.lower().startswith(("http://", "https://"))


def _origin(url: str) -> str:
    p = urlsplit(normalize_url(url))
    return f"{p.scheme}://{p.netloc}"


def parse_sitemap(body: bytes, max_bytes: int) -> tuple[str, list[str]] | None:
    """(``"sitemapindex"`` | ``"urlset"`` | ``"text"``, loc URLs) of a sitemap (XML or plain text, either gzipped,
    a UTF-8 byte order mark allowed); None if unreadable."""
    if body[:2] == b"\x1f\x8b":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(body)) as gz:
                body = gz.read(max_bytes + 1)
        except (OSError, EOFError, zlib.error):
            return None
    if len(body) > max_bytes:
        return None
    body = body.lstrip().removeprefix(codecs.BOM_UTF8).lstrip()
    if not body.startswith(b"<"):  # the plain-text sitemap format: one absolute URL per line
        lines = body.decode("utf-8", errors="replace").splitlines()
        return "text", [line.strip() for line in lines if line.strip()]
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return None
    kind = root.tag.rsplit("}", 1)[-1]
    if kind not in ("sitemapindex", "urlset"):
        return None
    locs = []
    for entry in root:  # <url> / <sitemap>; their direct <loc> only (not image:loc and the like)
        for child in entry:
            if child.tag.rsplit("}", 1)[-1] == "loc" and child.text and child.text.strip():
                locs.append(child.text.strip())
    return kind, locs


def header_nofollow(value: str | None, agent: str = AGENT_TOKEN) -> bool:
    """True if an X-Robots-Tag value says nofollow or none, to everyone or to ``agent`` (scoped as ``opt_out``)."""
    return header_says([value or ""], NOFOLLOW_DIRECTIVES, agent)


def _robots_sitemaps(body: bytes | None) -> list[str]:
    """The ``Sitemap:`` URLs of a robots.txt body."""
    out = []
    for line in (body or b"").decode("utf-8", errors="replace").splitlines():
        key, _, value = line.split("#", 1)[0].partition(":")
        if key.strip().lower() == "sitemap" and value.strip():
            out.append(value.strip())
    return out


@dataclass
class _Frontier:
    """The crawl's bookkeeping: which URLs were admitted, which domains are in bounds, the page budget left."""

    cfg: CrawlConfig
    domains: frozenset[str]
    drops: Counter
    visited: set[str] = field(default_factory=set)  # normalised URLs admitted (or counted as not fetched)
    offsite: set[str] = field(default_factory=set)  # normalised off-site URLs already counted
    scheduled: int = 0

    def in_bounds(self, url: str) -> bool:
        """True if ``url``'s host is an allowed domain (or a subdomain of one, when enabled)."""
        if self.cfg.follow_offsite:
            return True
        host = _host(url)
        if host in self.domains:
            return True
        return self.cfg.include_subdomains and any(host.endswith("." + d) for d in self.domains)

    def admit(self, url: str, depth: int) -> str | None:
        """The normalised URL if it should be fetched at ``depth``, else None (counted once per URL)."""
        key = normalize_url(url)
        if key in self.visited or key in self.offsite:
            return None
        if not self.in_bounds(key):
            self.offsite.add(key)
            self.drops["offsite_link"] += 1
            return None
        self.visited.add(key)
        if depth > self.cfg.max_depth:
            self.drops["max_depth_reached"] += 1
            return None
        if self.scheduled >= self.cfg.max_pages:
            self.drops["max_pages_reached"] += 1
            return None
        self.scheduled += 1
        return key


async def _sitemap_pages(origins: list[str], fetcher, frontier: _Frontier) -> list[str]:
    """Page URLs listed by the sitemaps of ``origins`` (robots.txt ``Sitemap:`` lines, else /sitemap.xml)."""
    cfg, drops = frontier.cfg, frontier.drops
    queue: deque[str] = deque()
    for origin in origins:
        robots = await fetcher.fetch(origin + "/robots.txt", kind="robots")
        listed = _robots_sitemaps(robots.body) if robots.status == "success" else []
        queue.extend(resolve_url(u, origin + "/") or u for u in listed or ["/sitemap.xml"])
    pages: list[str] = []
    seen: set[str] = set()
    fetched = 0
    while queue and fetched < cfg.max_sitemaps:
        url = queue.popleft()
        if url in seen:
            continue
        seen.add(url)
        if resolve_url(url, url) is None:
            drops["sitemap_bad_url"] += 1
            continue
        if not frontier.in_bounds(url):
            drops["offsite_sitemap"] += 1
            continue
        fetched += 1
        result = await fetcher.fetch(url, kind="page")
        if result.status != "success":
            drops[f"sitemap_{result.status}"] += 1
            continue
        parsed = parse_sitemap(result.body or b"", cfg.max_sitemap_bytes)
        if parsed is None:
            drops["sitemap_invalid"] += 1
        elif parsed[0] == "sitemapindex":
            queue.extend(resolve_url(u, url) or u for u in parsed[1])
        else:
            # a text sitemap's lines must be absolute URLs: anything else (an XML file it misread) is not resolved
            urls = [resolve_url(u, url) if parsed[0] == "urlset" or _is_http(u) else None for u in parsed[1]]
            pages.extend(u for u in urls if u is not None)
            if None in urls:
                drops["sitemap_bad_url"] += urls.count(None)
    if queue:
        drops["sitemap_not_fetched"] += len(queue)
    return pages


async def _visit(url: str, fetcher, sem: asyncio.Semaphore, frontier: _Frontier) -> tuple[str, Page] | None:
    """Fetch and parse one page: (final URL, parsed page), or None with the reason counted."""
    drops = frontier.drops
    async with sem:
        result = await fetcher.fetch(url, kind="page")
    header_out = result.status == "opt_out"  # X-Robots-Tag noai / noimageai: as a meta noai, links still followed
    if header_out:
        drops["page_opt_out_header"] += 1
        if result.body is None:  # a fetcher that does not read an opted-out page: no links to follow
            return None
    elif result.status != "success":
        drops[f"page_{result.status}"] += 1
        return None
    final_url = result.final_url or url
    if normalize_url(final_url) != url and not frontier.in_bounds(final_url):  # redirected off the site
        drops["page_offsite_redirect"] += 1
        return None
    body = result.body or b""
    ctype = (result.content_type or "").lower()
    sniffed_html = not ctype and body.lstrip()[:1] == b"<"  # no Content-Type: look at the body
    if ctype not in HTML_TYPES and not sniffed_html:
        drops["not_html"] += 1
        return None
    charset = charset_from_content_type(result.headers.get("content-type"))
    try:
        page = extract_page(
            body, final_url, encoding=charset, drops=drops, cfg=frontier.cfg.extract, opted_out=header_out
        )
    except Exception:  # one odd page must not end a crawl of thousands
        drops["page_parse_error"] += 1
        return None
    if not page.nofollow and header_nofollow(result.headers.get("x-robots-tag")):
        page = replace(page, nofollow=True)
    return final_url, page


async def crawl(seeds: list[str], cfg: CrawlConfig, fetcher, drops: Counter) -> AsyncIterator[Record]:
    """Crawl breadth-first from ``seeds`` and yield each page's image records, pages in BFS order.

    Records come in a deterministic order for a deterministic site: pages level by level in discovery order,
    images in document order. A (url, caption) pair seen on an earlier page is counted as ``duplicate``.
    """
    bad = [s for s in seeds if resolve_url(s, s) is None]
    if bad or not seeds:
        raise ValueError(f"crawl seeds must be absolute http(s) URLs, got {bad or seeds!r}")
    domains = frozenset(d.lower() for d in cfg.allowed_domains) or frozenset(_host(s) for s in seeds)
    frontier = _Frontier(cfg, domains, drops)
    level = list(dict.fromkeys(normalize_url(s) for s in seeds))
    frontier.visited.update(level)
    frontier.scheduled = len(level)
    sitemap_urls: list[str] = []
    if cfg.use_sitemaps:
        origins = list(dict.fromkeys(_origin(s) for s in level))
        sitemap_urls = await _sitemap_pages(origins, fetcher, frontier)
    seen = SeenPairs()
    sem = asyncio.Semaphore(cfg.concurrency)
    window = max(1, cfg.concurrency * WINDOW_FACTOR)
    for depth in range(cfg.max_depth + 1):
        next_level: list[str] = []
        pending: deque[asyncio.Task] = deque()
        todo = iter(level)
        try:
            while True:
                while len(pending) < window and (url := next(todo, None)) is not None:
                    pending.append(asyncio.ensure_future(_visit(url, fetcher, sem, frontier)))
                if not pending:
                    break
                visited = await pending.popleft()
                if visited is None:
                    continue
                final_url, page = visited
                frontier.visited.add(normalize_url(final_url))
                for rec in page.records:
                    if seen.first_time(rec.url, rec.caption):
                        yield rec
                    else:
                        drops["duplicate"] += 1
                if page.nofollow:
                    drops["page_nofollow"] += 1
                    continue
                for link in page.links:
                    if (key := frontier.admit(link, depth + 1)) is not None:
                        next_level.append(key)
        finally:
            for task in pending:
                task.cancel()
        if depth == 0:
            next_level.extend(k for k in (frontier.admit(u, 1) for u in sitemap_urls) if k is not None)
        if not next_level:
            break
        level = next_level
