"""Fetching, timeouts, retries, size limits, redirects and address safety against a misbehaving server on 127.0.0.1."""

import asyncio
import dataclasses
import socket
import time

import pytest
from aiohttp.abc import AbstractResolver

from pipeline.fetch import FetchConfig, Fetcher
from tests.pipeline.badserver import LATIN1_HTML, PNG

FAST = FetchConfig(
    allow_private_network=True,
    connect_timeout=1.0,
    read_timeout=0.3,
    total_timeout=3.0,
    backoff=0.01,
    retries=2,
    max_body_bytes=1_000_000,
)


def fetch_all(urls, cfg=FAST, kind="image", resolver=None):
    """Fetch ``urls`` concurrently with one Fetcher; returns (results, fetcher)."""

    async def go():
        async with Fetcher(cfg, resolver=resolver) as f:
            return await asyncio.gather(*(f.fetch(u, kind) for u in urls)), f

    return asyncio.run(go())


def fetch(url, cfg=FAST, kind="image", resolver=None, **changes):
    cfg = dataclasses.replace(cfg, **changes)
    return fetch_all([url], cfg, kind, resolver)[0][0]


class TableResolver(AbstractResolver):
    """Resolves names from a table (never the network); unknown names fail like NXDOMAIN."""

    def __init__(self, table):
        self.table = table
        self.asked = []  # every host name looked up

    async def resolve(self, host, port=0, family=socket.AF_INET):
        self.asked.append(host)
        if host not in self.table:
            raise OSError(-2, "Name or service not known")
        ip = self.table[host]
        if isinstance(ip, BaseException):
            raise ip
        return [{"hostname": host, "host": ip, "port": port, "family": socket.AF_INET, "proto": 0, "flags": 0}]

    async def close(self):
        pass


# -- success and what comes back ---------------------------------------------------------------------------------
def test_success_and_user_agent(srv):
    r = fetch(srv.url("/ok.png?ua=1"))
    assert (r.status, r.http_status, r.content_type, r.body, r.attempts) == ("success", 200, "image/png", PNG, 1)
    assert r.error is None and r.final_url == r.url == srv.url("/ok.png?ua=1")
    assert r.headers["content-length"] == str(len(PNG))
    (req,) = [q for q in srv.requests("/ok.png") if q.target == "/ok.png?ua=1"]
    assert req.headers["user-agent"] == FAST.user_agent and FAST.user_agent.startswith("altforge/")
    assert "noai" in FAST.user_agent and req.headers["accept"].startswith("image/")
    assert all(q.headers["user-agent"] == FAST.user_agent for q in srv.requests("/robots.txt"))


def test_content_types_reported_as_served(srv):
    assert fetch(srv.url("/wrong-content-type.png")).content_type == "text/plain"
    missing = fetch(srv.url("/no-content-type.png"))
    assert missing.status == "success" and missing.content_type is None and missing.body == PNG
    html = fetch(srv.url("/html-as-image.jpg"))  # the image decoder, not the fetcher, rejects it
    assert html.status == "success" and html.content_type == "image/jpeg" and html.body.startswith(b"<!doctype html")


def test_non_utf8_page_bytes_untouched(srv):
    r = fetch(srv.url("/latin1.html"), kind="page")
    assert r.status == "success" and r.body == LATIN1_HTML and r.content_type == "text/html"
    assert "iso-8859-1" in r.headers["content-type"]


def test_keep_alive_reuses_connections(fresh):
    results, _ = fetch_all([fresh.url(f"/ok.png?i={i}") for i in range(30)], dataclasses.replace(FAST, concurrency=2))
    assert all(r.status == "success" for r in results)
    clients = {q.client for q in fresh.log}
    assert len(fresh.log) == 31 and len(clients) <= 3  # 31 requests (robots.txt too) over at most 3 connections


# -- timeouts --------------------------------------------------------------------------------------------------
def test_slow_headers_stall_quickly(srv):
    t0 = time.monotonic()
    r = fetch(srv.url("/slow?s=5&n=1"), retries=0)
    assert r.status == "stalled" and r.http_status is None and r.body is None
    assert time.monotonic() - t0 < 1.5


def test_slow_headers_hit_total_timeout(srv):
    r = fetch(srv.url("/slow?s=5&n=2"), retries=0, read_timeout=5.0, total_timeout=0.4)
    assert r.status == "timeout" and r.elapsed < 1.5


def test_stalled_body(srv):
    r = fetch(srv.url("/stall?s=5"), retries=0)
    assert r.status == "stalled" and r.elapsed < 1.5 and "read_timeout" in r.error


def test_dripping_body_hits_total_timeout(srv):
    r = fetch(srv.url("/drip"), retries=0, read_timeout=1.0, total_timeout=0.5)
    assert r.status == "timeout" and r.elapsed < 1.5


def test_connect_timeout():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # never accepted: once the queue is full, further SYNs are dropped
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        for s in fillers:
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
        try:
            r = fetch(f"http://127.0.0.1:{port}/x.png", respect_robots=False, retries=0, connect_timeout=0.3)
        finally:
            for s in fillers:
                s.close()
    assert r.status == "timeout" and "connect" in r.error and r.elapsed < 1.5


def test_connection_refused():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    r = fetch(f"http://127.0.0.1:{port}/x.png", respect_robots=False)
    assert r.status == "connection_error" and r.attempts == 3 and "connect" in r.error


# -- retries ---------------------------------------------------------------------------------------------------
def test_reset_mid_body_is_retried(fresh):
    r = fetch(fresh.url("/reset"))
    assert r.status == "connection_error" and r.attempts == 3
    assert fresh.hits("/reset") == 3


def test_flaky_503_retried_until_success(fresh):
    r = fetch(fresh.url("/flaky?fail=2"))
    assert r.status == "success" and r.attempts == 3 and r.body == PNG
    assert fresh.hits("/flaky?fail=2") == 3


def test_flaky_503_gives_up_after_retries(fresh):
    r = fetch(fresh.url("/flaky?fail=5"), retries=1)
    assert r.status == "http_503" and r.http_status == 503 and r.attempts == 2
    assert fresh.hits("/flaky?fail=5") == 2


def test_flaky_reset_retried_until_success(fresh):
    r = fetch(fresh.url("/flaky-reset?fail=2"))
    assert r.status == "success" and r.body == PNG
    assert fresh.hits("/flaky-reset?fail=2") >= 3


@pytest.mark.parametrize(("code", "hits"), [(404, 1), (403, 1), (410, 1), (500, 3), (502, 3)])
def test_retry_only_transient_statuses(fresh, code, hits):
    r = fetch(fresh.url(f"/status/{code}"))
    assert r.status == f"http_{code}" and r.http_status == code and r.attempts == hits
    assert fresh.hits(f"/status/{code}") == hits


@pytest.mark.parametrize("code", [429, 503])
def test_retry_after_is_honoured(fresh, code):
    r = fetch(fresh.url(f"/retry-after?s=1&code={code}"))
    assert r.status == "success" and r.attempts == 2
    first, second = fresh.requests("/retry-after")
    assert second.time - first.time >= 0.9  # backoff alone would be ~10 ms


def test_retry_after_beyond_cap_is_not_waited_for(fresh):
    r = fetch(fresh.url("/retry-after?s=30"), retry_after_cap=1.0)
    assert r.status == "http_429" and r.headers["retry-after"] == "30" and r.elapsed < 1.0
    assert fresh.hits("/retry-after") == 1


# -- size ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/huge", "/huge-chunked"])
def test_huge_body_stops_at_limit(fresh, path):
    t0 = time.monotonic()
    r = fetch(fresh.url(path + "?mb=100"))
    assert r.status == "body_too_large" and r.body is None and r.attempts == 1
    assert time.monotonic() - t0 < 3
    deadline = time.monotonic() + 3
    while fresh.in_flight() and time.monotonic() < deadline:  # the server notices the closed connection
        time.sleep(0.02)
    assert fresh.in_flight() == 0
    assert fresh.bytes_sent(path) < 30_000_000  # far from the 100 MB it would have sent


@pytest.mark.parametrize("path", ["/huge?mb=0.9", "/huge-chunked?mb=0.9"])
def test_body_under_limit_read_whole(srv, path):
    r = fetch(srv.url(path))
    assert r.status == "success" and len(r.body) == 900_000 and set(r.body) == {ord("x")}


# -- redirects -------------------------------------------------------------------------------------------------
def test_redirect_chain(srv):
    r = fetch(srv.url("/chain/5"))  # exactly max_redirects hops
    assert r.status == "success" and r.final_url == srv.url("/chain/0") and r.body == PNG
    r = fetch(srv.url("/chain/6"))
    assert r.status == "too_many_redirects"
    assert fetch(srv.url("/chain/2"), max_redirects=1).status == "too_many_redirects"


def test_redirect_loop_detected(fresh):
    r = fetch(fresh.url("/loop/a"))
    assert r.status == "too_many_redirects" and "loop" in r.error
    assert fresh.hits("/loop/a") == 1 and fresh.hits("/loop/b") == 1
    assert fetch(fresh.url("/self-redirect")).status == "too_many_redirects"


def test_relative_and_loopback_redirects_followed_when_allowed(srv):
    r = fetch(srv.url("/redirect?to=ok.png"))
    assert r.status == "success" and r.final_url == srv.url("/ok.png")
    r = fetch(srv.url("/redirect-loopback"))
    assert r.status == "success" and r.final_url == f"http://127.0.0.1:{srv.port}/ok.png"


def test_redirect_to_metadata_refused_even_with_allow_private(srv):
    r = fetch(srv.url("/redirect-metadata"), connect_timeout=0.2)
    assert r.status == "refused_address" and "169.254.169.254" in r.error and r.http_status == 302


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://127.0.0.1/"])
def test_redirect_to_other_scheme_refused(srv, target):
    assert fetch(srv.url(f"/redirect?to={target}")).status == "refused_scheme"


def test_bad_redirect_location(srv):
    r = fetch(srv.url("/redirect?to=http://[zz"))
    assert r.status == "invalid_url" and r.http_status == 302
    assert fetch(srv.url("/redirect?to=http://a%20b/")).status == "invalid_url"  # never looked up


def test_overlong_host_names_refused_before_any_lookup(srv):
    long_host = "a" * 64 + ".example.org"
    resolver = TableResolver({})
    r = fetch(srv.url(f"/redirect?to=http://{long_host}/x.jpg"), resolver=resolver)
    assert (r.status, r.http_status, r.final_url) == (
        "invalid_url",
        302,
        srv.url(f"/redirect?to=http://{long_host}/x.jpg"),
    )
    assert "too long" in r.error and r.error.startswith("redirect:")
    direct = fetch(f"http://{long_host}/x.jpg", resolver=resolver)
    assert direct.status == "invalid_url" and direct.attempts == 0 and "too long" in direct.error
    name_too_long = ".".join(["b" * 63] * 4)
    assert fetch(f"http://{name_too_long}/x.jpg", resolver=resolver).status == "invalid_url"
    assert resolver.asked == []  # neither the image, its robots.txt nor the redirect target was looked up

    async def go():
        async with Fetcher(FAST, resolver=resolver) as f:
            return await f.robots_allowed(f"http://{long_host}/x.jpg")

    assert asyncio.run(go()) is False and resolver.asked == []


@pytest.mark.parametrize("exc", [UnicodeError("label empty or too long"), ValueError("bad name")])
def test_a_resolver_encoding_error_is_a_dns_error(exc):
    resolver = TableResolver({"odd.test": exc})
    r = fetch("http://odd.test/a.png", resolver=resolver, retries=0)
    assert r.status == "dns_error" and "odd.test" in r.error and type(exc).__name__ in r.error
    assert resolver.asked == ["odd.test"]  # robots.txt failed on the lookup; the image was not tried again


@pytest.mark.parametrize("exc", [UnicodeError("encoding with 'idna' codec failed"), ValueError("weird URL")])
def test_value_errors_from_the_http_client_end_as_invalid_url(exc):
    def boom(*args, **kwargs):
        raise exc

    async def go():
        async with Fetcher(dataclasses.replace(FAST, respect_robots=False)) as f:
            f._session.get = boom
            return await f.fetch("http://127.0.0.1:1/a.png"), await f.fetch("http://127.0.0.1:1/p", "page")

    for r in asyncio.run(go()):
        assert r.status == "invalid_url" and type(exc).__name__ in r.error and r.attempts == 1


def test_tls_to_a_plain_http_port(srv):
    r = fetch(f"https://127.0.0.1:{srv.port}/ok.png", respect_robots=False, retries=2)
    assert r.status == "tls_error" and r.attempts == 1  # the handshake fails the same way every time: no retry


# -- safety ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://127.0.0.1/a.png", "data:image/png;base64,iVBORw0KGgo=", "javascript:x"]
)
def test_non_http_schemes_refused(url):
    r = fetch(url)
    assert r.status == "refused_scheme" and r.attempts == 0 and r.body is None


@pytest.mark.parametrize("url", ["", "not a url", "http://", "http://u:p@127.0.0.1/"])
def test_invalid_urls(url):
    assert fetch(url).status == "invalid_url"


def test_private_network_refused_without_a_single_request(fresh):
    port = fresh.port
    urls = [
        fresh.url("/ok.png"),
        f"http://localhost:{port}/ok.png",
        f"http://2130706433:{port}/ok.png",
        f"http://0x7f.1:{port}/ok.png",
        f"http://127.1:{port}/ok.png",
        f"http://[::ffff:127.0.0.1]:{port}/ok.png",
        f"http://sneaky.test:{port}/ok.png",  # resolves to 127.0.0.1: refused after resolution
    ]
    resolver = TableResolver({"sneaky.test": "127.0.0.1"})
    results, f = fetch_all(urls, dataclasses.replace(FAST, allow_private_network=False), resolver=resolver)
    assert [r.status for r in results] == ["refused_address"] * len(urls)
    assert "127.0.0.1" in results[-1].error
    assert fresh.hits() == 0
    assert f.stats["refused_address"] == len(urls)


def test_resolver_is_used_when_private_allowed(fresh):
    resolver = TableResolver({"sneaky.test": "127.0.0.1"})
    r = fetch(f"http://sneaky.test:{fresh.port}/ok.png", resolver=resolver)
    assert r.status == "success" and fresh.hits("/ok.png") == 1
    assert fresh.requests("/ok.png")[0].headers["host"] == f"sneaky.test:{fresh.port}"


def test_dns_error():
    r = fetch("http://nxdomain.test/a.png", resolver=TableResolver({}))
    assert r.status == "dns_error" and "nxdomain.test" in r.error


# -- API contract ----------------------------------------------------------------------------------------------
def test_bad_kind_and_closed_fetcher_are_programming_errors():
    async def go():
        async with Fetcher(FAST) as f:
            with pytest.raises(ValueError):
                await f.fetch("http://127.0.0.1:1/", kind="video")
        with pytest.raises(RuntimeError):
            await f.fetch("http://127.0.0.1:1/")

    asyncio.run(go())


def test_retry_after_reads_only_ascii_seconds_or_a_date():
    from pipeline.fetch import _retry_after

    assert _retry_after("120") == 120.0 and _retry_after(" 7 ") == 7.0
    assert _retry_after("²") is None and _retry_after("١٢") is None  # digits to str.isdigit, not to float
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: no wait
    assert _retry_after("soon") is None and _retry_after(None) is None


def test_a_bad_certificate_is_a_permanent_tls_error_not_a_retried_connection_error():
    import ssl

    import aiohttp
    from aiohttp.client_reqrep import ConnectionKey

    from pipeline.fetch import TRANSIENT, _error_reason

    key = ConnectionKey("example.invalid", 443, True, True, None, None, None)  # no connection is made
    cert = aiohttp.ClientConnectorCertificateError(key, ssl.SSLCertVerificationError(1, "certificate verify failed"))
    status, detail = _error_reason(cert)
    assert status == "tls_error" and status not in TRANSIENT and "certificate verify failed" in detail
    reset = aiohttp.ClientConnectorError(key, ConnectionResetError(104, "reset"))
    assert _error_reason(reset)[0] == "connection_error" and "connection_error" in TRANSIENT


def test_a_stalled_or_cut_body_after_a_404_or_a_redirect_keeps_the_status(fresh):
    def stall_404(ex):  # a short error body that never finishes
        ex.start(404, {"Content-Length": "100", "Content-Type": "text/plain"})
        ex.write(b"not fou")
        ex.sleep(2)

    def stall_301(ex):
        ex.start(301, {"Content-Length": "100", "Location": "/ok.png"})
        ex.write(b"moved")
        ex.sleep(2)

    def reset_404(ex):
        ex.start(404, {"Content-Length": "100"})
        ex.write(b"x")
        ex.reset()

    fresh.route("/stall404", stall_404)
    fresh.route("/stall301", stall_301)
    fresh.route("/reset404", reset_404)
    r404, r301, reset = fetch_all([fresh.url(p) for p in ("/stall404", "/stall301", "/reset404")], FAST)[0]
    assert (r404.status, r404.http_status, r404.attempts) == ("http_404", 404, 1)  # not a retried "stalled"
    assert r301.status == "success" and r301.final_url.endswith("/ok.png")  # the redirect is followed
    assert (reset.status, reset.attempts) == ("http_404", 1)


def test_a_body_in_an_encoding_not_asked_for_is_a_permanent_bad_encoding(fresh):
    for path, encoding, body in (("/br", "br", b"\x1b\x00\x00"), ("/badgzip", "gzip", b"\x1f\x8bnot gzip at all")):
        fresh.add(path, body, content_type="image/png", headers=[("Content-Encoding", encoding)])
    br, bad_gzip = fetch_all([fresh.url("/br"), fresh.url("/badgzip")], FAST)[0]
    for r, path in ((br, "/br"), (bad_gzip, "/badgzip")):
        assert r.status == "bad_encoding" and r.attempts == 1 and fresh.hits(path) == 1, (r.status, r.error)
    assert "content-encoding" in br.error
