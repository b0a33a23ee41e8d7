"""The fetcher's verdict on responses that look fine but are not: an opted-out redirect hop, 204, 205 and 206.

Real HTTP on 127.0.0.1 (allow_private_network=True: it is loopback), as in test_fetch.py.
"""

import pytest

from tests.pipeline.badserver import PAGE_HTML, PNG, BadServer
from tests.pipeline.test_fetch import fetch


@pytest.fixture
def fresh():
    """A server of its own, so request counts are exact."""
    with BadServer() as server:
        yield server


def opted_out_hop(server: BadServer, path: str, to: str, tag: str = "noai", code: int = 302) -> None:
    """``path`` redirects to ``to`` with an X-Robots-Tag on the redirect response itself."""
    server.route(path, lambda ex: ex.respond(code, b"", headers=[("Location", to), ("X-Robots-Tag", tag)]))


@pytest.mark.parametrize("tag", ["noai", "noimageai", "altforge: noai"])
def test_an_opt_out_on_a_redirect_hop_opts_out_the_image(fresh, tag):
    opted_out_hop(fresh, "/hop.png", "/ok.png", tag)
    r = fetch(fresh.url("/hop.png"))
    assert (r.status, r.http_status, r.body) == ("opt_out", 302, None)
    assert r.final_url == fresh.url("/hop.png") and tag in r.error and r.error.startswith("redirect:")
    assert fresh.hits("/ok.png") == 0  # the target is not fetched: it would not be kept
    assert fetch(fresh.url("/hop.png"), respect_opt_out=False).status == "success"


def test_an_opt_out_on_an_earlier_hop_of_a_chain_counts(fresh):
    opted_out_hop(fresh, "/first", "/redirect?to=/ok.png", "noimageai", code=301)
    r = fetch(fresh.url("/first"))
    assert r.status == "opt_out" and r.body is None and fresh.hits("/ok.png") == 0
    other = "/other-hop"
    opted_out_hop(fresh, other, "/ok.png", "otherbot: noai")  # not addressed to altforge
    assert fetch(fresh.url(other)).status == "success"


def test_an_opt_out_on_a_redirect_hop_of_a_page_comes_back_as_a_200_opt_out_does(fresh):
    fresh.add("/page.html", PAGE_HTML, content_type="text/html")
    opted_out_hop(fresh, "/moved", "/page.html", "noimageai")
    r = fetch(fresh.url("/moved"), kind="page")
    # the body comes back for its links, as for a page answered 200 with the header; its images are not taken
    assert (r.status, r.http_status, r.body) == ("opt_out", 200, PAGE_HTML)
    assert r.final_url == fresh.url("/page.html") and "noimageai" in r.error
    opted_out_hop(fresh, "/moved-gone", "/missing", "noai")
    assert fetch(fresh.url("/moved-gone"), kind="page").status == "http_404"  # a failure stays that failure
    assert fetch(fresh.url("/moved"), kind="page", respect_opt_out=False).status == "success"


@pytest.mark.parametrize("kind", ["image", "page"])
def test_no_content_and_partial_content_are_not_a_fetched_image_or_page(fresh, kind):
    fresh.route("/204", lambda ex: ex.start(204, [("Content-Type", "image/png")]))
    fresh.route("/205", lambda ex: ex.respond(205, b"", "image/png"))
    headers = [("Content-Range", f"bytes 0-19/{len(PNG)}")]
    fresh.route("/206", lambda ex: ex.respond(206, PNG[:20], "image/png", headers))
    for code in (204, 205, 206):
        r = fetch(fresh.url(f"/{code}"), kind=kind)
        assert (r.status, r.http_status, r.body, r.attempts) == (f"http_{code}", code, None, 1)
    fresh.route("/203", lambda ex: ex.respond(203, PNG, "image/png"))  # a proxy's copy of a 200: the whole image
    r = fetch(fresh.url("/203"), kind=kind)
    assert (r.status, r.body) == ("success", PNG)
    assert fetch(fresh.url("/redirect?to=/206"), kind=kind).status == "http_206"  # the final status counts


def test_a_robots_txt_answered_204_is_an_empty_one(fresh):
    fresh.set_robots(b"", status=204)  # RFC 9309 2.3.1.1: any 2xx is read; empty allows all
    r = fetch(fresh.url("/ok.png"))
    assert r.status == "success" and r.body == PNG and fresh.hits("/robots.txt") == 1
