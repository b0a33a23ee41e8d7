"""The polite, safe async HTTP fetcher of the scrape stage: one aiohttp session, guarded addresses, robots.txt.

``Fetcher.fetch`` never raises for network, HTTP or robots problems: it returns a :class:`FetchResult` whose
``status`` is ``"success"`` or one snake_case reason:

``http_<code>`` (a final status other than 200 or 203, so also ``http_204`` No Content and ``http_206`` Partial
Content: altforge never asks for a range, and a part is not the image or page; robots.txt takes any 2xx),
``timeout`` (connect or total), ``stalled`` (no byte for ``read_timeout``, waiting for headers or body),
``connection_error`` (refused, reset, incomplete body, bad HTTP),
``tls_error`` (a certificate or TLS handshake the server will fail again: not retried), ``dns_error``,
``body_too_large``, ``refused_address``, ``refused_scheme``, ``invalid_url``,
``too_many_redirects`` (also loops), ``robots_disallowed`` (robots.txt disallows the path),
``robots_unavailable`` (robots.txt answered 5xx / 429 or failed on the network: the host is treated as disallowed
for ``ROBOTS_RETRY_SECONDS``, and a later run may retry), ``opt_out`` (X-Robots-Tag noai / noimageai on the
response or on a redirect hop to it: the hop's header speaks for the URL asked for).

Safety: every URL, redirect hops included, passes :func:`pipeline.netguard.check_url`; host names resolve through
:class:`pipeline.netguard.GuardedResolver`, so connections go only to checked addresses. Politeness: robots.txt
per origin (fetched once, shared by concurrent callers, cached; a failed fetch only briefly), a per-host concurrency
cap and optional rate (per Fetcher: see :meth:`FetchConfig.for_processes`), an identifying User-Agent, retries with
exponential backoff and jitter for transient failures only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import time
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from importlib.metadata import PackageNotFoundError, version

import aiohttp
from aiohttp.abc import AbstractResolver
from yarl import URL

from pipeline.netguard import AddressRefused, GuardedResolver, NameLookupError, RefusedURL, check_url
from pipeline.robots import ALLOW_ALL, DISALLOW_ALL, ROBOTS_MAX_BYTES, RobotsRules, opt_out, parse_robots

try:
    _VERSION = version("altforge")
except PackageNotFoundError:  # running from a source tree that was never installed
    _VERSION = "0"

KINDS = ("image", "page", "robots")
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
OK_CODES = frozenset({200, 203})  # a body that is the whole resource (203: a proxy's copy of a 200) for images, pages
REDIRECT_REFUSALS = frozenset({"refused_address", "refused_scheme", "invalid_url"})  # a Location not followed
TRANSIENT = frozenset({"timeout", "stalled", "connection_error", "http_429"})  # plus every http_5xx
CHUNK_BYTES = 256 * 1024  # read size for response bodies
ROBOTS_CACHE_SIZE = 100_000  # origins whose robots.txt is kept
ROBOTS_RETRY_SECONDS = 60.0  # a robots.txt that could not be fetched (5xx, 429, network) is fetched again after this
ROBOTS_MAX_AGE_SECONDS = 24 * 3600.0  # a fetched one is kept at most this long (RFC 9309 2.4: no more than 24 hours)
_ACCEPT = {
    "image": "image/avif,image/webp,image/png,image/jpeg,image/*;q=0.8,*/*;q=0.5",
    "page": "text/html,application/xhtml+xml;q=0.9,*/*;q=0.5",
    "robots": "text/plain,*/*;q=0.5",
}


@dataclass(frozen=True)
class FetchConfig:
    """How the fetcher talks to the web: timeouts, limits, retries, politeness and safety switches."""

    user_agent: str = f"altforge/{_VERSION} (image-text dataset builder; respects robots.txt and noai)"
    connect_timeout: float = 5.0  # seconds, DNS lookup and TCP/TLS connect
    read_timeout: float = 10.0  # seconds without receiving a byte (stalled headers or body)
    total_timeout: float = 30.0  # seconds per HTTP request (each redirect hop is one), whole body included
    max_body_bytes: int = 20_000_000  # bytes, after decompression; larger -> "body_too_large", stops reading
    max_redirects: int = 5  # hops followed per attempt
    retries: int = 2  # extra attempts, for transient failures only (5xx, 429, timeout, stalled, connection_error)
    backoff: float = 0.5  # seconds before the first retry, doubled each time, times a 0.5-1.5 jitter
    retry_after_cap: float = 10.0  # seconds; a longer Retry-After on 429/503 is not waited for (no retry)
    concurrency: int = 64  # open requests per Fetcher (per process)
    per_host_concurrency: int = 16  # open requests per scheme+host+port, per Fetcher (see for_processes)
    per_host_rate: float = 0.0  # requests per second per scheme+host+port, per Fetcher; 0 = unlimited
    allow_private_network: bool = False  # allow loopback/private addresses (the demo site); never link-local
    respect_robots: bool = True  # check robots.txt before image and page requests (redirect hops too)
    respect_opt_out: bool = True  # X-Robots-Tag noai / noimageai (also "altforge: noai") on image and page responses

    def for_processes(self, n: int) -> FetchConfig:
        """This config with the per-host limits split across ``n`` processes that fetch at once, one Fetcher each.

        A Fetcher enforces ``per_host_rate`` and ``per_host_concurrency`` on its own requests only, so when ``n``
        processes fetch at once the caller must give each of them ``cfg.for_processes(n)``: the rate is split
        exactly (rate / n), the concurrency rounded up (ceil(c / n), at least 1: a host may see up to ``n - 1`` more
        open requests than ``c`` when ``n`` does not divide it). ``concurrency`` stays per process; ``n`` = 1 returns
        the config unchanged.
        """
        if n < 1:
            raise ValueError(f"the number of fetching processes must be at least 1, not {n}")
        if n == 1:
            return self
        return dataclasses.replace(
            self,
            per_host_rate=self.per_host_rate / n,
            per_host_concurrency=max(1, math.ceil(self.per_host_concurrency / n)),
        )


@dataclass
class FetchResult:
    """What one ``fetch`` produced: a body on success (and on a page's ``opt_out``), else a reason; never raises."""

    url: str
    final_url: str
    status: str  # "success" or a snake_case reason
    http_status: int | None = None
    content_type: str | None = None  # media type only, lower-case, no parameters
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names; repeated headers joined by ", "
    body: bytes | None = None
    error: str | None = None  # one-line human-readable detail
    attempts: int = 0  # attempts made, retries included (0 when the URL itself was refused before any)
    elapsed: float = 0.0  # seconds, robots.txt, retries and backoff included

    @property
    def ok(self) -> bool:
        """True on success."""
        return self.status == "success"


@dataclass
class _Host:
    """Per scheme+host+port politeness state."""

    sem: asyncio.Semaphore
    users: int = 0
    next_time: float = 0.0  # loop time before which the next request may not start (rate limit)
    last_start: float = -math.inf  # loop time the last request started, inside the global slot (rate limit)


@dataclass
class _Hop:
    """One HTTP request's outcome; ``location`` is set for a redirect to follow."""

    status: str
    http_status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    error: str | None = None
    location: str | None = None
    opted_out: bool = False  # X-Robots-Tag noai / noimageai (image and page requests, with respect_opt_out)


def _headers(resp: aiohttp.ClientResponse) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in resp.headers.items():
        name = name.lower()
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def _error_reason(exc: BaseException) -> tuple[str, str]:
    """Map an aiohttp / OS exception to (status, one-line detail)."""
    if isinstance(
        exc, aiohttp.ClientSSLError
    ):  # before ClientConnectorError, its base: a bad certificate is permanent
        return "tls_error", " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
    if isinstance(exc, aiohttp.ClientConnectorError):
        inner = exc.os_error
        if isinstance(inner, AddressRefused):
            return "refused_address", str(inner)
        if isinstance(inner, NameLookupError) or isinstance(exc, aiohttp.ClientConnectorDNSError):
            return "dns_error", str(inner)
        return "connection_error", f"cannot connect: {inner.strerror or inner}"
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return "stalled", "no data received within read_timeout"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "timeout", "connect timed out"
    if isinstance(exc, TimeoutError):
        return "timeout", "request exceeded total_timeout"
    if isinstance(exc, aiohttp.InvalidURL):
        return "invalid_url", f"invalid URL: {exc}"
    detail = " ".join(str(exc).split())  # one line
    if isinstance(exc, aiohttp.ClientResponseError | aiohttp.ClientPayloadError) and "content-encoding" in detail:
        # a body in an encoding we did not ask for (br, zstd) or a corrupt gzip one: the same on every attempt
        return "bad_encoding", f"{type(exc).__name__}: {detail}"[:200]
    return "connection_error", f"{type(exc).__name__}: {detail}"[:200]


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date), None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def _parse_url(url: str) -> URL:
    """Parse ``url`` as aiohttp will, without the fragment; raises RefusedURL("invalid_url")."""
    try:
        parsed = URL(url.strip())
        return parsed.with_fragment(None) if parsed.raw_fragment else parsed
    except (ValueError, TypeError, UnicodeError) as exc:
        raise RefusedURL("invalid_url", f"cannot parse URL: {exc}") from None


def _origin(url: URL) -> str:
    return f"{url.scheme}://{url.raw_host}:{url.port}"


class Fetcher:
    """An async HTTP client for images, pages and robots.txt; use ``async with Fetcher(cfg) as f``.

    ``resolver`` does the name lookups beneath the address guard (default: getaddrinfo in a thread).
    """

    def __init__(self, cfg: FetchConfig, resolver: AbstractResolver | None = None):
        self.cfg = cfg
        self.stats: Counter = Counter()  # status -> count over fetch() calls
        self._inner_resolver = resolver
        self._session: aiohttp.ClientSession | None = None
        self._global: asyncio.Semaphore | None = None
        self._hosts: dict[str, _Host] = {}
        self._robots: dict[str, asyncio.Task] = {}
        self._robots_expiry: dict[str, float] = {}  # origin -> loop time after which a failed robots.txt is refetched

    async def __aenter__(self) -> Fetcher:
        cfg = self.cfg
        connector = aiohttp.TCPConnector(
            limit=cfg.concurrency,
            limit_per_host=cfg.per_host_concurrency,
            resolver=GuardedResolver(cfg.allow_private_network, self._inner_resolver),
            ttl_dns_cache=300,
            keepalive_timeout=30,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers={"User-Agent": cfg.user_agent},
            timeout=aiohttp.ClientTimeout(
                total=cfg.total_timeout, connect=cfg.connect_timeout, sock_read=cfg.read_timeout
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,  # no proxies from the environment: connections go where the guard checked
        )
        self._global = asyncio.Semaphore(cfg.concurrency)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        """Cancel pending robots.txt loads and close the HTTP session."""
        for task in self._robots.values():
            task.cancel()
        self._robots.clear()
        self._robots_expiry.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- public ----------------------------------------------------------------------------------------------
    async def fetch(self, url: str, kind: str = "image") -> FetchResult:
        """GET ``url`` (``kind``: "image", "page" or "robots") with every safety and politeness rule applied."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        if self._session is None:
            raise RuntimeError("use the Fetcher inside 'async with'")
        t0 = time.monotonic()
        result = await self._fetch(url, kind)
        result.elapsed = time.monotonic() - t0
        self.stats[result.status] += 1
        return result

    async def robots_allowed(self, url: str) -> bool:
        """True if robots.txt of ``url``'s origin lets our agent fetch it (False for refused URLs)."""
        try:
            target = _parse_url(url)
            check_url(target, self.cfg.allow_private_network)
        except RefusedURL:
            return False
        return await self._robots_verdict(target) is None

    # -- the fetch pipeline ----------------------------------------------------------------------------------
    async def _fetch(self, url: str, kind: str) -> FetchResult:
        try:
            target = _parse_url(url)
            check_url(target, self.cfg.allow_private_network)
        except RefusedURL as exc:
            return FetchResult(url, url, exc.reason, error=exc.message)
        attempt = 0
        while True:
            attempt += 1
            result = await self._attempt(url, target, kind)
            result.attempts = attempt
            delay = self._retry_delay(result, attempt)
            if delay is None:
                return result
            await asyncio.sleep(delay)

    def _retry_delay(self, result: FetchResult, attempt: int) -> float | None:
        """Seconds to wait before retrying ``result``, or None for no retry."""
        transient = result.status in TRANSIENT or result.status.startswith("http_5")
        if not transient or attempt > self.cfg.retries:
            return None
        if result.http_status in (429, 503):
            wait = _retry_after(result.headers.get("retry-after"))
            if wait is not None:
                return wait if wait <= self.cfg.retry_after_cap else None
        return self.cfg.backoff * 2 ** (attempt - 1) * (0.5 + random.random())

    async def _attempt(self, url: str, target: URL, kind: str) -> FetchResult:
        """One attempt: the request and its redirect hops, each checked (URL, robots, resolved address)."""
        seen = {str(target)}
        current = target
        hop_opt_out = None  # the X-Robots-Tag of a redirect hop that opted out: it speaks for ``url``
        for hops in range(self.cfg.max_redirects + 1):
            if kind != "robots" and self.cfg.respect_robots:
                verdict = await self._robots_verdict(current)
                if verdict is not None:
                    return FetchResult(url, str(current), verdict[0], error=verdict[1])
            hop = await self._request(current, kind)
            if hop.location is None:
                ctype = hop.headers.get("content-type", "").split(";", 1)[0].strip().lower() or None
                status, error = hop.status, hop.error
                if hop_opt_out is not None and status == "success":  # a page: its body back, as a 200 opt-out's
                    status, error = "opt_out", hop_opt_out
                return FetchResult(url, str(current), status, hop.http_status, ctype, hop.headers, hop.body, error)
            if hop.opted_out:
                detail = f"redirect: X-Robots-Tag: {hop.headers.get('x-robots-tag')}"
                if kind == "image":  # the image is not taken, wherever the hop points
                    return FetchResult(
                        url, str(current), "opt_out", hop.http_status, headers=hop.headers, error=detail
                    )
                hop_opt_out = hop_opt_out or detail
            if hops == self.cfg.max_redirects:
                break
            try:
                try:
                    nxt = current.join(_parse_url(hop.location)).with_fragment(None)
                except (ValueError, TypeError, UnicodeError) as exc:
                    raise RefusedURL("invalid_url", f"bad Location {hop.location[:100]!r}: {exc}") from None
                check_url(nxt, self.cfg.allow_private_network)
            except RefusedURL as exc:
                return FetchResult(url, str(current), exc.reason, hop.http_status, error=f"redirect: {exc.message}")
            if str(nxt) in seen:
                return FetchResult(url, str(nxt), "too_many_redirects", hop.http_status, error="redirect loop")
            seen.add(str(nxt))
            current = nxt
        return FetchResult(
            url, str(current), "too_many_redirects", error=f"more than {self.cfg.max_redirects} redirects"
        )

    async def _request(self, url: URL, kind: str) -> _Hop:
        """One GET inside the host and global slots; reads at most the body limit."""
        limit = ROBOTS_MAX_BYTES if kind == "robots" else self.cfg.max_body_bytes
        async with self._slot(_origin(url)):
            try:
                async with self._session.get(url, allow_redirects=False, headers={"Accept": _ACCEPT[kind]}) as resp:
                    return await self._read(resp, kind, limit)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                status, detail = _error_reason(exc)
                return _Hop(status, error=detail)
            except ValueError as exc:  # UnicodeError too: a host or URL aiohttp cannot encode, past check_url
                return _Hop("invalid_url", error=f"cannot request URL: {type(exc).__name__}: {exc}"[:200])

    async def _read(self, resp: aiohttp.ClientResponse, kind: str, limit: int) -> _Hop:
        code, headers = resp.status, _headers(resp)
        opted_out = kind != "robots" and self.cfg.respect_opt_out and opt_out(resp.headers.getall("X-Robots-Tag", ()))
        if code in REDIRECT_CODES and "location" in headers:
            await self._drain(resp)
            return _Hop(f"http_{code}", code, headers, location=resp.headers["Location"], opted_out=opted_out)
        if not (200 <= code < 300 if kind == "robots" else code in OK_CODES):  # RFC 9309: any 2xx robots.txt is read
            await self._drain(resp)
            return _Hop(f"http_{code}", code, headers, error=f"HTTP {code} {resp.reason or ''}".strip())
        if opted_out and kind == "image":
            resp.close()
            return _Hop("opt_out", code, headers, error=f"X-Robots-Tag: {headers.get('x-robots-tag')}")
        too_large = _Hop("body_too_large", code, headers, error=f"body larger than {limit} bytes")
        if kind != "robots" and resp.content_length is not None and resp.content_length > limit:
            resp.close()
            return too_large
        chunks, size = [], 0
        async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                resp.close()
                if kind != "robots":
                    return too_large
                chunks[-1] = chunk[: len(chunk) - (size - limit)]  # robots.txt: keep the first 500 KB
                break
        if opted_out:  # a page's body still comes back: a crawl follows its links (its images are not taken)
            return _Hop("opt_out", code, headers, b"".join(chunks), f"X-Robots-Tag: {headers.get('x-robots-tag')}")
        return _Hop("success", code, headers, b"".join(chunks))

    @staticmethod
    async def _drain(resp: aiohttp.ClientResponse) -> None:
        """Read a small error/redirect body so the connection can be reused; close on anything bigger. A body that
        stalls or breaks off costs the connection only: the status and Location already read stand."""
        if resp.content_length is not None and resp.content_length <= 65536:
            try:
                await resp.read()
            except (TimeoutError, aiohttp.ClientError, OSError):
                resp.close()
        else:
            resp.close()

    @asynccontextmanager
    async def _slot(self, key: str):
        """Hold a per-host and a global request slot, after waiting for the host's rate limit."""
        host = self._hosts.get(key)
        if host is None:
            if len(self._hosts) >= 10_000:  # forget idle hosts whose rate-limit wait has passed
                now = asyncio.get_running_loop().time()
                for k in [k for k, h in self._hosts.items() if h.users == 0 and h.next_time <= now]:
                    del self._hosts[k]
            host = self._hosts[key] = _Host(asyncio.Semaphore(self.cfg.per_host_concurrency))
        host.users += 1
        try:
            async with host.sem:
                rate = self.cfg.per_host_rate
                if rate > 0:  # wait for the host's turn outside the global slot, leaving it to other hosts
                    now = asyncio.get_running_loop().time()
                    start = max(now, host.next_time)
                    host.next_time = start + 1.0 / rate
                    if start > now:
                        await asyncio.sleep(start - now)
                async with self._global:
                    if rate > 0:  # a full global pool may have held several of the host's turns: space them again
                        now = asyncio.get_running_loop().time()
                        start = max(now, host.last_start + 1.0 / rate)
                        host.last_start = start
                        host.next_time = max(host.next_time, start + 1.0 / rate)
                        if start > now:
                            await asyncio.sleep(start - now)
                    yield
        finally:
            host.users -= 1
            if host.users == 0 and host.next_time <= asyncio.get_running_loop().time():
                self._hosts.pop(key, None)

    # -- robots.txt ------------------------------------------------------------------------------------------
    async def _robots_verdict(self, url: URL) -> tuple[str, str] | None:
        """None if robots.txt allows ``url``; else (status, detail) to report."""
        origin = _origin(url)
        task = self._robots.get(origin)
        if task is None or self._robots_expiry.get(origin, math.inf) <= asyncio.get_running_loop().time():
            if len(self._robots) >= ROBOTS_CACHE_SIZE:
                done = [k for k, t in self._robots.items() if t.done()][: ROBOTS_CACHE_SIZE // 10]
                for k in done:
                    del self._robots[k]
                    self._robots_expiry.pop(k, None)
            self._robots_expiry.pop(origin, None)
            task = self._robots[origin] = asyncio.ensure_future(self._load_robots(url))
        rules, failure = await asyncio.shield(task)
        if failure is not None:
            return failure
        return None if rules.allowed(url.raw_path_qs) else ("robots_disallowed", "robots.txt disallows this path")

    async def _load_robots(self, url: URL) -> tuple[RobotsRules, tuple[str, str] | None]:
        """Fetch and parse robots.txt of ``url``'s origin; a failure is kept for ``ROBOTS_RETRY_SECONDS`` only, the
        rules for ``ROBOTS_MAX_AGE_SECONDS`` (a long crawl follows a site's changed robots.txt)."""
        result = await self._fetch(str(url.origin().with_path("/robots.txt")), "robots")
        rules, failure = _robots_outcome(result)
        keep = ROBOTS_RETRY_SECONDS if failure is not None else ROBOTS_MAX_AGE_SECONDS
        self._robots_expiry[_origin(url)] = asyncio.get_running_loop().time() + keep
        return rules, failure


def _robots_outcome(result: FetchResult) -> tuple[RobotsRules, tuple[str, str] | None]:
    """The rules a robots.txt fetch gives: (rules, None), or (DISALLOW_ALL, (status, detail)) on failure.

    As Google does: 2xx is parsed, 4xx (but 429), a redirect chain too long or a redirect we refuse to follow (to a
    private address, another scheme, a bad URL) allows everything, 5xx, 429 and network failures disallow
    everything (RFC 9309 2.3.1.4) as ``robots_unavailable``, a transient status. A refused address, a failed name
    lookup or a bad certificate of the host itself is reported as itself (permanent, like the page or image's own
    fetch would be).
    """
    if result.status == "success":
        return parse_robots(result.body or b""), None
    if result.status == "too_many_redirects" or (
        result.http_status is not None and 400 <= result.http_status < 500 and result.http_status != 429
    ):
        return ALLOW_ALL, None
    if result.status in REDIRECT_REFUSALS and (result.error or "").startswith("redirect:"):
        return ALLOW_ALL, None  # robots.txt redirected where we do not go: not found, like a redirect chain too long
    if result.status in ("refused_address", "dns_error", "tls_error"):
        return DISALLOW_ALL, (result.status, result.error or "")
    return DISALLOW_ALL, ("robots_unavailable", f"robots.txt unavailable ({result.status}): disallow all")
