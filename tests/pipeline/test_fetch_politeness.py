"""The fetcher's politeness against a misbehaving server on 127.0.0.1: robots.txt, X-Robots-Tag opt-out, limits."""

import asyncio
import dataclasses
import socket

import pytest

from pipeline import fetch as fetch_module
from pipeline.fetch import FetchConfig, Fetcher
from tests.pipeline.badserver import PNG, ROBOTS_DISALLOW_ALTFORGE, ROBOTS_DISALLOW_PRIVATE, ROBOTS_MALFORMED
from tests.pipeline.test_fetch import FAST, fetch, fetch_all


# -- robots.txt ------------------------------------------------------------------------------------------------
def test_robots_disallow_private_fetched_once(fresh):
    fresh.set_robots(ROBOTS_DISALLOW_PRIVATE)
    urls = [fresh.url(f"/private/{i}.png") for i in range(5)] + [fresh.url(f"/ok.png?i={i}") for i in range(5)]
    results, f = fetch_all(urls)
    assert [r.status for r in results] == ["robots_disallowed"] * 5 + ["success"] * 5
    assert fresh.hits("/robots.txt") == 1 and fresh.hits("/ok.png") == 5
    assert not any(q.path.startswith("/private") for q in fresh.log)
    assert f.stats == {"robots_disallowed": 5, "success": 5}


def test_concurrent_callers_share_one_slow_robots_fetch(fresh):
    fresh.route("/robots.txt", lambda ex: ex.sleep(0.15) and ex.respond(200, ROBOTS_DISALLOW_PRIVATE, "text/plain"))
    results, _ = fetch_all([fresh.url(f"/ok.png?i={i}") for i in range(8)])
    assert all(r.status == "success" for r in results) and fresh.hits("/robots.txt") == 1


def test_robots_malformed_lines_ignored(fresh):
    fresh.set_robots(ROBOTS_MALFORMED)
    paths = ["/private/x.png", "/private/ok.png", "/no-colon", "/before-any-group", "/ok.png"]
    results, _ = fetch_all([fresh.url(p) for p in paths])
    assert [r.status for r in results] == ["robots_disallowed", "success", "http_404", "http_404", "success"]


def test_robots_specific_agent_group(fresh):
    fresh.set_robots(ROBOTS_DISALLOW_ALTFORGE)
    assert fetch(fresh.url("/ok.png")).status == "robots_disallowed" and fresh.hits("/ok.png") == 0


@pytest.mark.parametrize(
    ("status", "expected"),
    [(404, "success"), (403, "success"), (500, "robots_unavailable"), (503, "robots_unavailable")],
)
def test_robots_status_rules(fresh, status, expected):
    fresh.set_robots(b"User-agent: *\nDisallow: /\n", status=status)  # the body only counts on 2xx
    results, _ = fetch_all([fresh.url("/ok.png"), fresh.url("/ok.png?again")])
    assert [r.status for r in results] == [expected, expected]
    assert fresh.hits("/ok.png") == (2 if expected == "success" else 0)
    assert fresh.hits("/robots.txt") == (3 if status >= 500 else 1)  # 5xx retried, then cached
    if expected == "robots_unavailable":
        assert f"robots.txt unavailable (http_{status})" in results[0].error


def test_robots_429_is_unavailable_not_disallowed(fresh):
    fresh.set_robots(b"", status=429)
    r = fetch(fresh.url("/ok.png"), retries=0)
    assert r.status == "robots_unavailable" and "http_429" in r.error and fresh.hits("/ok.png") == 0


def test_robots_network_failure_disallows(fresh):
    fresh.route("/robots.txt", lambda ex: ex.reset())
    r = fetch(fresh.url("/ok.png"))
    assert r.status == "robots_unavailable" and fresh.hits("/ok.png") == 0 and "connection_error" in r.error
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    assert fetch(f"http://127.0.0.1:{port}/x.png").status == "robots_unavailable"


def test_a_failed_robots_fetch_expires_but_a_fetched_one_stays_cached(fresh, monkeypatch):
    monkeypatch.setattr(fetch_module, "ROBOTS_RETRY_SECONDS", 0.3)
    fresh.set_robots(b"busy", status=503)
    cfg = dataclasses.replace(FAST, retries=0)

    async def go():
        statuses = []
        async with Fetcher(cfg) as f:
            statuses.append((await f.fetch(fresh.url("/ok.png?1"))).status)
            fresh.set_robots(ROBOTS_DISALLOW_PRIVATE)
            statuses.append((await f.fetch(fresh.url("/ok.png?2"))).status)  # the failure is still cached
            hits = [fresh.hits("/robots.txt")]
            await asyncio.sleep(0.4)
            statuses.append((await f.fetch(fresh.url("/ok.png?3"))).status)  # expired: fetched again
            statuses.append((await f.fetch(fresh.url("/private/a.png"))).status)
            fresh.set_robots(b"busy", status=503)
            await asyncio.sleep(0.4)
            statuses.append((await f.fetch(fresh.url("/ok.png?4"))).status)  # a fetched robots.txt is kept
            hits.append(fresh.hits("/robots.txt"))
        return statuses, hits

    statuses, hits = asyncio.run(go())
    assert statuses == ["robots_unavailable", "robots_unavailable", "success", "robots_disallowed", "success"]
    assert hits == [1, 2]


def test_a_fetched_robots_txt_is_fetched_again_after_its_max_age(fresh, monkeypatch):
    monkeypatch.setattr(fetch_module, "ROBOTS_MAX_AGE_SECONDS", 0.3)  # 24 hours in a crawl (RFC 9309 2.4)

    async def go():
        statuses = []
        async with Fetcher(FAST) as f:
            statuses.append((await f.fetch(fresh.url("/private/a.png"))).status)  # no robots.txt yet: allowed
            fresh.set_robots(ROBOTS_DISALLOW_PRIVATE)
            statuses.append((await f.fetch(fresh.url("/private/a.png?2"))).status)  # the cached one still rules
            await asyncio.sleep(0.4)
            statuses.append((await f.fetch(fresh.url("/private/a.png?3"))).status)  # aged out: the site's new one
        return statuses, fresh.hits("/robots.txt")

    statuses, hits = asyncio.run(go())
    assert statuses[1:] == [statuses[0], "robots_disallowed"] and statuses[0] != "robots_disallowed"
    assert hits == 2


def test_robots_redirect_followed(fresh):
    fresh.route("/robots.txt", lambda ex: ex.redirect("/real-robots.txt", 301))
    fresh.add("/real-robots.txt", ROBOTS_DISALLOW_PRIVATE, content_type="text/plain")
    results, _ = fetch_all([fresh.url("/private/a.png"), fresh.url("/ok.png")])
    assert [r.status for r in results] == ["robots_disallowed", "success"]


def test_robots_larger_than_cap_truncated(fresh):
    fresh.set_robots(b"User-agent: *\nDisallow: /private\n" + b"#" * 600_000 + b"\nDisallow: /late\n")
    results, _ = fetch_all([fresh.url("/private/a.png"), fresh.url("/late")])
    assert [r.status for r in results] == ["robots_disallowed", "http_404"]  # /late was past 500 KB


def test_robots_applies_to_redirect_targets(fresh):
    fresh.set_robots(ROBOTS_DISALLOW_PRIVATE)
    r = fetch(fresh.url("/redirect?to=/private/a.png"))
    assert r.status == "robots_disallowed" and fresh.hits("/private/a.png") == 0


def test_robots_can_be_ignored_and_queried(fresh):
    fresh.set_robots(ROBOTS_DISALLOW_PRIVATE)
    assert fetch(fresh.url("/private/a.png"), respect_robots=False).status == "success"

    async def go():
        async with Fetcher(FAST) as f:
            return await f.robots_allowed(fresh.url("/private/a.png")), await f.robots_allowed(fresh.url("/a.png"))

    assert asyncio.run(go()) == (False, True)


def test_a_robots_txt_the_fetch_cannot_follow_or_trust(fresh):
    from pipeline.fetch import FetchResult, _robots_outcome

    # a redirect we refuse to follow: not found, as a chain too long is (the site's own images still count)
    for status in ("refused_address", "refused_scheme", "invalid_url"):
        refused = FetchResult("u", "u", status, 302, error=f"redirect: {status}")
        assert _robots_outcome(refused)[1] is None
    direct = FetchResult("u", "u", "refused_address", error="address 10.0.0.1 is not public")
    assert _robots_outcome(direct)[1][0] == "refused_address"  # the host itself: the image would fail the same way
    tls = FetchResult("u", "u", "tls_error", error="certificate verify failed")
    assert _robots_outcome(tls)[1][0] == "tls_error"  # permanent, as for the image itself: not robots_unavailable
    fresh.route("/robots.txt", lambda ex: ex.redirect("ftp://127.0.0.1/robots.txt"))
    assert fetch(fresh.url("/ok.png"), FAST).status == "success"


# -- opt-out ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/noai.png", "opt_out"),
        ("/noimageai.png", "opt_out"),
        ("/ua-noai.png", "opt_out"),
        ("/multi-xrt.png", "opt_out"),
        ("/other-noai.png", "success"),
    ],
)
def test_x_robots_tag_opt_out(srv, path, expected):
    r = fetch(srv.url(path))
    assert r.status == expected and r.http_status == 200 and r.attempts == 1
    assert (r.body is None) == (expected == "opt_out")


def test_opt_out_on_pages_and_switch(srv):
    assert fetch(srv.url("/noai.png"), kind="page").status == "opt_out"
    assert fetch(srv.url("/noai.png"), respect_opt_out=False).status == "success"


# -- politeness limits -----------------------------------------------------------------------------------------
def test_per_host_concurrency_limit(fresh):
    cfg = dataclasses.replace(FAST, per_host_concurrency=3, read_timeout=2.0)
    results, _ = fetch_all([fresh.url(f"/slow?s=0.15&i={i}") for i in range(12)], cfg)
    assert all(r.status == "success" for r in results)
    assert fresh.max_in_flight == 3  # reached, never exceeded


def test_global_concurrency_limit(fresh):
    cfg = dataclasses.replace(FAST, concurrency=2, read_timeout=2.0)
    results, _ = fetch_all([fresh.url(f"/slow?s=0.1&i={i}") for i in range(6)], cfg)
    assert all(r.status == "success" for r in results) and fresh.max_in_flight == 2


def test_for_processes_splits_the_per_host_limits():
    cfg = FetchConfig(per_host_rate=2.0, per_host_concurrency=16, concurrency=64)
    assert cfg.for_processes(1) is cfg
    two = cfg.for_processes(2)
    assert (two.per_host_rate, two.per_host_concurrency, two.concurrency) == (1.0, 8, 64)
    assert dataclasses.replace(two, per_host_rate=2.0, per_host_concurrency=16) == cfg  # nothing else changes
    three = cfg.for_processes(3)
    assert three.per_host_rate == pytest.approx(2 / 3) and three.per_host_concurrency == 6  # ceil(16 / 3)
    small = FetchConfig(per_host_rate=0.0, per_host_concurrency=1).for_processes(4)
    assert (small.per_host_rate, small.per_host_concurrency) == (0.0, 1)  # unlimited stays unlimited; never 0
    assert (cfg.per_host_rate, cfg.per_host_concurrency) == (2.0, 16)  # the original is untouched
    with pytest.raises(ValueError):
        cfg.for_processes(0)


def test_for_processes_configures_each_fetchers_limiter(fresh):
    cfg = dataclasses.replace(FAST, per_host_rate=10.0, per_host_concurrency=6).for_processes(2)

    async def go():  # two Fetchers in one loop stand for two worker processes
        async with Fetcher(cfg) as a, Fetcher(cfg) as b:
            assert a._session.connector.limit_per_host == b._session.connector.limit_per_host == 3
            urls = [fresh.url(f"/ok.png?i={i}") for i in range(3)]
            return await asyncio.gather(*(f.fetch(u) for f in (a, b) for u in urls))

    assert all(r.status == "success" for r in asyncio.run(go()))
    times = sorted(q.time for q in fresh.log)  # each Fetcher: robots.txt + 3 images at 5/s
    assert len(times) == 8 and times[-1] - times[0] >= 0.55  # the 10/s of one Fetcher would take 0.3 s


def test_per_host_rate_limit(fresh):
    cfg = dataclasses.replace(FAST, per_host_rate=10.0)
    results, _ = fetch_all([fresh.url(f"/ok.png?i={i}") for i in range(6)], cfg)
    assert all(r.status == "success" for r in results)
    times = sorted(q.time for q in fresh.log)  # robots.txt + 6 images
    assert len(times) == 7
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert times[-1] - times[0] >= 0.55  # 6 gaps of 1/rate = 0.1 s
    assert min(gaps) >= 0.05  # never a burst (slack for a busy machine)


def test_the_rate_limit_holds_when_the_global_pool_was_full(fresh):
    def hold(ex):  # another host's request holds the only global slot for a while
        ex.sleep(1.0)
        ex.respond(200, PNG, "image/png")

    fresh.route("/hold.png", hold)
    cfg = dataclasses.replace(
        FAST, concurrency=1, per_host_rate=4.0, read_timeout=3.0, total_timeout=10.0, respect_robots=False
    )
    other = fresh.url("/hold.png").replace("127.0.0.1", "localhost")  # another origin, the same server

    async def go():
        async with Fetcher(cfg) as f:
            first = asyncio.ensure_future(f.fetch(other))
            await asyncio.sleep(0.2)  # the slot is taken; the six below queue behind it
            rest = [f.fetch(fresh.url(f"/ok.png?i={i}")) for i in range(6)]
            return await asyncio.gather(first, *rest)

    results = asyncio.run(go())
    assert all(r.status == "success" for r in results), [r.status for r in results]
    times = sorted(q.time for q in fresh.log if q.path == "/ok.png")
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(times) == 6 and min(gaps) >= 0.2, gaps  # 1/rate = 0.25 s: they were sent together before
