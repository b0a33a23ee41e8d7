"""The demo web site: determinism, ground truth, HTTP behaviour, concurrency, and a real browser."""

from __future__ import annotations

import hashlib
import http.client
import io
import random
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import urllib.robotparser
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import numpy as np
import pytest
from PIL import Image

from pipeline.demo_site import (
    BACKGROUNDS,
    COLOURS,
    KINDS,
    SHAPES,
    DemoSiteConfig,
    DemoSiteServer,
    build_site,
    describe,
    mismatch_share,
    random_scene,
    read_ground_truth,
    render_scene,
    serve,
    write_ground_truth,
)
from pipeline.demo_site.scenes import RGB

N = 200
MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff", "webp": b"RIFF"}


@pytest.fixture(scope="module")
def server():
    with serve(DemoSiteConfig(seed=0, n_images=N)) as srv:
        yield srv


@pytest.fixture(scope="module")
def rows(server):
    return server.ground_truth_rows()


def fetch(url: str) -> tuple[int, dict, bytes]:
    """GET over loopback; 4xx/5xx come back as values, not exceptions."""
    assert urlsplit(url).hostname in ("127.0.0.1", "::1"), url
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


class _Tags(HTMLParser):
    """Collects <base href>, <img> (src, alt) and <a href> in document order; attribute entities are decoded."""

    def __init__(self):
        super().__init__()
        self.base, self.imgs, self.links, self.meta = None, [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "base":
            self.base = a.get("href")
        elif tag == "img":
            self.imgs.append((a.get("src"), a.get("alt")))
        elif tag == "a":
            self.links.append(a.get("href"))
        elif tag == "meta":
            self.meta.append(a)


def parse(text: str) -> _Tags:
    p = _Tags()
    p.feed(text)
    return p


def page_urls(server: DemoSiteServer) -> list[str]:
    return [server.origin + p.path for p in server.site.pages]


def normalise(body: bytes, srv: DemoSiteServer) -> bytes:
    return body.replace(srv.origin.encode(), b"ORIGIN")


# --- scenes ----------------------------------------------------------------------------------------------------------


def test_vocabulary_and_captions_name_every_shape():
    assert len(SHAPES) >= 6 and len(COLOURS) >= 8 and len(BACKGROUNDS) >= 4
    rng = random.Random(3)
    for _ in range(300):
        spec = random_scene(rng)
        assert spec.background not in {s.colour for s in spec.shapes}
        text = describe(spec, rng).lower()
        for s in spec.shapes:
            assert f"{s.colour} {s.shape}" in text, (text, spec)


def test_render_scene_shows_the_shape_colour_at_32px():
    rng = random.Random(5)
    for _ in range(20):
        spec = random_scene(rng)
        big = render_scene(spec, (150, 100))
        assert big.size == (150, 100) and big.mode == "RGB"
        small = np.asarray(render_scene(spec, 32), dtype=np.float32)
        for s in spec.shapes:  # the shape colour is really there: some pixels lie close to it
            dist = np.linalg.norm(small - np.array(RGB[s.colour], dtype=np.float32), axis=-1)
            assert (dist < 40).sum() >= 12, (spec, s)


# --- determinism -----------------------------------------------------------------------------------------------------


def test_same_seed_serves_identical_bytes_and_ground_truth(server, rows):
    with serve(DemoSiteConfig(seed=0, n_images=N)) as twin:
        assert twin.port != server.port
        urls = page_urls(server) + [server.origin + x for x in ("/robots.txt", "/sitemap.xml")]
        urls += sorted({r["url"] for r in rows if r["http_status"] == 200})
        for url in urls:
            a = fetch(url)
            b = fetch(url.replace(server.origin, twin.origin))
            assert a[0] == b[0] == 200, url
            assert normalise(a[2], server) == normalise(b[2], twin), url
        twin_rows = [{k: str(v).replace(twin.origin, "O") for k, v in r.items()} for r in twin.ground_truth_rows()]
    assert [{k: str(v).replace(server.origin, "O") for k, v in r.items()} for r in rows] == twin_rows


def test_different_seed_differs(rows):
    other = build_site(DemoSiteConfig(seed=1, n_images=N))
    assert other.page_html("/gallery/1.html", "http://x") != build_site(DemoSiteConfig(seed=0, n_images=N)).page_html(
        "/gallery/1.html", "http://x"
    )
    other_rows = other.ground_truth_rows("http://x/")
    assert [r["attributes"] for r in other_rows] != [r["attributes"] for r in rows]


def test_startup_is_fast_for_the_default_size():
    t0 = time.perf_counter()
    site = build_site(DemoSiteConfig())
    assert time.perf_counter() - t0 < 2.0
    assert sum(1 for i in site.images.values() if i.spec is not None) == 3000


# --- ground truth ----------------------------------------------------------------------------------------------------


def test_ground_truth_contents(rows, tmp_path, server):
    assert {r["kind"] for r in rows} == set(KINDS)
    share = mismatch_share(rows)
    assert 0.15 <= share <= 0.25, share
    for r in rows:
        if r["kind"] == "content":
            assert r["alt"] and isinstance(r["matches"], bool)
            same = r["caption_attributes"] == r["attributes"]
            assert same == r["matches"], r
            if not r["matches"]:  # a mismatch names other colour/shape content
                key = sorted((s["shape"], s["colour"]) for s in r["caption_attributes"]["shapes"])
                assert key != sorted((s["shape"], s["colour"]) for s in r["attributes"]["shapes"])
        if r["kind"] == "no_alt":
            assert r["alt"] in (None, "") and r["matches"] is None
        assert r["allowed"] == (r["forbidden_reason"] is None)
        assert r["fetchable"] == (r["sha256"] is not None)
    reasons = {r["forbidden_reason"] for r in rows}
    assert {"robots", "noai_header", "meta_noai"} <= reasons
    assert sum(r["alt"] is None for r in rows if r["kind"] == "no_alt") > 0
    assert sum(r["alt"] == "" for r in rows if r["kind"] == "no_alt") > 0
    path = tmp_path / "gt.jsonl"
    assert write_ground_truth(server.site, path, server.url) == len(rows)
    assert read_ground_truth(path) == rows


def test_formats_and_duplicates_over_http(rows):
    seen = {}
    for r in rows:
        if r["kind"] == "content" and r["format"] in MAGIC and r["format"] not in seen:
            status, headers, body = fetch(r["url"])
            assert status == 200 and body.startswith(MAGIC[r["format"]]), r["url"]
            assert headers["Content-Type"] == f"image/{r['format']}"
            seen[r["format"]] = body
    assert set(seen) == {"png", "jpeg", "webp"}
    assert seen["webp"][8:12] == b"WEBP"
    by_image: dict[str, set] = {}
    for r in rows:
        if r["kind"] == "content" and r["fetchable"]:
            by_image.setdefault(r["image_id"], set()).add(r["url"])
    dup_id, urls = max(by_image.items(), key=lambda kv: len(kv[1]))
    assert len(urls) >= 2
    digests = {hashlib.sha256(fetch(u)[2]).hexdigest() for u in urls}
    assert digests == {next(r["sha256"] for r in rows if r["image_id"] == dup_id)}


# --- HTTP ------------------------------------------------------------------------------------------------------------


def test_robots_and_sitemap(server, rows):
    status, _, body = fetch(server.url + "robots.txt")
    assert status == 200
    rp = urllib.robotparser.RobotFileParser()
    rp.parse(body.decode().splitlines())
    assert rp.site_maps() == [server.url + "sitemap.xml"]
    assert not rp.can_fetch("*", server.url + "private/index.html")
    assert rp.can_fetch("*", server.url + "gallery/1.html")
    for r in rows:  # ground truth agrees with robots.txt
        blocked = not rp.can_fetch("*", r["page_url"]) or (
            r["url"].startswith(server.origin) and not rp.can_fetch("*", r["url"])
        )
        assert blocked == (r["forbidden_reason"] == "robots"), r
    private = [r for r in rows if r["forbidden_reason"] == "robots"]
    assert any(r["page_url"].startswith(server.url + "private/") for r in private)
    assert any(fetch(r["url"])[0] == 200 for r in private if r["fetchable"])
    sitemap = fetch(server.url + "sitemap.xml")[2].decode()
    locs = [chunk.split("</loc>")[0] for chunk in sitemap.split("<loc>")[1:]]
    assert sum("/gallery/" in u for u in locs) >= 2
    for u in locs:
        assert fetch(u)[0] == 200, u


def test_noai_header_and_meta(server, rows):
    noai = [r for r in rows if r["forbidden_reason"] == "noai_header"]
    assert noai
    for r in noai[:3]:
        assert fetch(r["url"])[1].get("X-Robots-Tag") == "noai"
    ok = next(r for r in rows if r["kind"] == "content" and r["allowed"])
    assert "X-Robots-Tag" not in fetch(ok["url"])[1]
    meta_page = next(r["page_url"] for r in rows if r["forbidden_reason"] == "meta_noai")
    metas = parse(fetch(meta_page)[2].decode()).meta
    assert {"name": "robots", "content": "noai, noimageai"} in metas


def test_missing_truncated_and_content_images(rows):
    missing = next(r for r in rows if r["kind"] == "missing")
    assert fetch(missing["url"])[0] == 404
    trunc = next(r for r in rows if r["kind"] == "truncated")
    status, headers, body = fetch(trunc["url"])
    assert status == 200 and int(headers["Content-Length"]) == len(body) > 0
    with pytest.raises(OSError):
        Image.open(io.BytesIO(body)).load()
    for r in [r for r in rows if r["kind"] == "content" and r["fetchable"]][:10]:
        status, _, body = fetch(r["url"])
        assert hashlib.sha256(body).hexdigest() == r["sha256"]
        img = Image.open(io.BytesIO(body))
        img.load()
        assert img.size == (r["width"], r["height"])
    pixel = next(r for r in rows if r["kind"] == "pixel")
    assert Image.open(io.BytesIO(fetch(pixel["url"])[2])).size == (1, 1)
    icon = next(r for r in rows if r["kind"] == "icon")
    assert max(Image.open(io.BytesIO(fetch(icon["url"])[2])).size) <= 32 and icon["alt"] in ("icon", "logo")


def test_pages_match_ground_truth_and_leave_only_to_invalid_hosts(server, rows):
    by_page: dict[str, list] = {}
    for r in rows:
        by_page.setdefault(r["page_url"], []).append((r["url"], r["alt"]))
    offsite_links = offsite_imgs = 0
    bases = 0
    for url in page_urls(server):
        status, headers, body = fetch(url)
        assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
        text = body.decode("utf-8")  # raises if not UTF-8
        assert text.startswith("<!DOCTYPE html>") and "<img" in text
        tags = parse(text)
        base = urljoin(url, tags.base) if tags.base else url
        bases += tags.base is not None
        assert [(urljoin(base, src), alt) for src, alt in tags.imgs] == by_page[url], url
        for link in tags.links + [src for src, _ in tags.imgs]:
            host = urlsplit(urljoin(base, link)).hostname
            if host != "127.0.0.1":
                assert host.endswith(".invalid"), link
                offsite_links += link in tags.links
                offsite_imgs += link not in tags.links
    assert bases >= 1 and offsite_links > 0 and offsite_imgs > 0
    alts = [r["alt"] for r in rows if r["alt"]]
    assert any("&" in a for a in alts) and any('"' in a for a in alts)


def test_navigation_reaches_every_gallery_page(server):
    depth, queue = {server.url: 0}, [server.url]
    while queue:  # breadth-first crawl over on-site links
        url = queue.pop(0)
        status, headers, body = fetch(url)
        assert status == 200, url
        if not headers["Content-Type"].startswith("text/html"):
            continue
        tags = parse(body.decode())
        base = urljoin(url, tags.base) if tags.base else url
        for link in tags.links:
            nxt = urljoin(base, link).split("#")[0]
            if nxt.startswith(server.origin) and nxt not in depth:
                depth[nxt] = depth[url] + 1
                queue.append(nxt)
    galleries = [p.path for p in server.site.pages if p.path.startswith("/gallery/")]
    assert len(galleries) >= 3
    assert all(server.origin + g in depth for g in galleries)
    assert max(depth.values()) >= 2


def test_keep_alive_and_head(server, rows):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    targets = ["/", "/robots.txt", urlsplit(next(r["url"] for r in rows if r["kind"] == "missing")).path]
    targets.append(urlsplit(next(r["url"] for r in rows if r["kind"] == "truncated")).path)
    statuses = []
    for t in targets:
        conn.request("GET", t)
        resp = conn.getresponse()
        body = resp.read()
        assert int(resp.getheader("Content-Length")) == len(body)
        statuses.append(resp.status)
    sock = conn.sock
    conn.request("HEAD", "/gallery/1.html")
    resp = conn.getresponse()
    assert resp.read() == b"" and int(resp.getheader("Content-Length")) > 0
    assert conn.sock is sock  # one connection carried every request
    conn.close()
    assert statuses == [200, 200, 404, 200]


def test_thirty_two_parallel_requests(server, rows):
    urls = [r["url"] for r in rows if r["fetchable"]][:24] + page_urls(server)[:8]
    assert len(urls) == 32
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(fetch, urls))
    assert [s for s, _, _ in results] == [200] * 32
    assert all(len(b) > 0 for _, _, b in results)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "example.com", "::"])
def test_refuses_non_loopback_hosts(host):
    with pytest.raises(ValueError, match="loopback"):
        serve(DemoSiteConfig(n_images=20), host=host)


# --- a real browser --------------------------------------------------------------------------------------------------


def _chromium() -> str | None:
    if shutil.which("/usr/bin/chromium"):
        return "/usr/bin/chromium"
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_headless_chromium_renders_a_gallery_page(server, rows, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("Chromium not found: apt-get install chromium (the CI script installs it)")
    url = server.url + "gallery/2.html"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--no-pings",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # nothing but loopback resolves
    ]
    dom = subprocess.run([exe, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=60, check=True)
    tags = parse(dom.stdout)
    expected = [(u, a) for p, u, a in ((r["page_url"], r["url"], r["alt"]) for r in rows) if p == url]
    assert len(expected) > 10
    base = urljoin(url, tags.base) if tags.base else url
    assert [(urljoin(base, s), a) for s, a in tags.imgs] == expected
    shot = tmp_path / "shot.png"
    cmd = [exe, *flags, f"--screenshot={shot}", "--window-size=1000,1200", url]
    subprocess.run(cmd, capture_output=True, timeout=60, check=True)
    pic = np.asarray(Image.open(shot).convert("RGB"))
    assert pic.shape[:2] == (1200, 1000)
    assert len(np.unique(pic.reshape(-1, 3), axis=0)) > 50  # text and pictures, not a blank page
    # the pictures themselves were drawn (not only alt text): the first picture's shape colour is on screen
    first = next(r for r in rows if r["page_url"] == url and r["kind"] in ("content", "no_alt") and r["fetchable"])
    colour = np.array(RGB[first["attributes"]["shapes"][0]["colour"]], dtype=np.float32)
    assert (np.linalg.norm(pic.astype(np.float32) - colour, axis=-1) < 30).sum() > 100


def test_the_cli_serves_pages_that_curl_reads(tmp_path):
    import os
    import signal
    import socket
    import sys

    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl not found: apt-get install curl")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    gt = tmp_path / "gt.jsonl"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "demo-site",
            "--port",
            str(port),
            "--images",
            "60",
            "--ground-truth",
            str(gt),
        ],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        while "demo site:" not in (line := proc.stdout.readline()):
            assert line, "demo-site exited early"
        page = subprocess.run(
            [curl, "-sf", f"http://127.0.0.1:{port}/gallery/1.html"], capture_output=True, timeout=30
        )
        assert page.returncode == 0 and b"<img" in page.stdout
        rows = read_ground_truth(gt)
        img = next(r for r in rows if r["kind"] == "content" and r["page_url"].endswith("/gallery/1.html"))
        body = subprocess.run([curl, "-sf", img["url"]], capture_output=True, timeout=30).stdout
        assert hashlib.sha256(body).hexdigest() == img["sha256"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
