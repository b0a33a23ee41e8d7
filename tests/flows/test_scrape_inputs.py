"""The other two inputs end to end: a URL list (img2dataset-style parquet, with retries) and a WARC archive."""

import io
import subprocess
import sys
import urllib.request

import pandas as pd
import pytest

from pipeline import shards
from pipeline.demo_site import DemoSiteConfig, serve
from pipeline.manifest import read_manifest
from tests.flows.test_scrape_flow import ROOT
from tests.pipeline.badserver import BadServer


def run(*args):
    p = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return p


@pytest.fixture(scope="module")
def site():
    with serve(DemoSiteConfig(seed=5, n_images=120), port=0) as srv:
        yield srv


def test_url_list_and_retry_failed(site, tmp_path):
    rows = [r for r in site.ground_truth_rows() if r["kind"] == "content" and r["allowed"] and r["fetchable"]][:60]
    with BadServer() as bad:
        # 503 for the first 5 requests: the first run's 3 attempts fail, the retry run's third attempt succeeds
        flaky = [bad.url(f"/flaky?fail=5&i={i}") for i in range(2)]
        urls = [r["url"] for r in rows] + [site.url + "missing/a.png"] + flaky
        captions = [r["alt"] for r in rows] + ["gone", "flaky one", "flaky two"]
        df = pd.DataFrame({"URL": urls, "TEXT": captions, "license": "cc0"})
        df.to_parquet(tmp_path / "list.parquet")
        out = tmp_path / "ds"
        common = ("--out", str(out), "--allow-private-network", "--image-size", "32", "--resize", "pad")
        lst = str(tmp_path / "list.parquet")
        run("scrape", "--url-list", lst, "--url-col", "URL", "--caption-col", "TEXT", *common)
        m = read_manifest(str(out))
        assert m["stats"]["seen"] == 63 and m["stats"]["kept"] == 60
        assert m["stats"]["dropped"] == {"http_404": 1, "http_503": 2}
        sample = next(shards.iter_samples(shards.shard_urls(str(out))[0]))
        assert sample["json"]["caption"] == sample["txt"] and sample["txt"] in set(df["TEXT"])
        assert sample["jpg"][:2] == b"\xff\xd8"
        run("scrape", "--retry-failed", *common)  # only the transient 503s are redone, into a new shard
    m2 = read_manifest(str(out))
    assert [s["name"] for s in m2["shards"]] == ["000000.tar", "000001.tar"]
    assert m2["shards"][1]["samples"] == 2 and m2["stats"]["kept"] == 62
    retried = list(shards.iter_samples(str(out / "000001.tar")))
    assert sorted(s["txt"] for s in retried) == ["flaky one", "flaky two"]
    assert {s["json"]["retry_of"] for s in retried} == {"000000000061", "000000000062"}


def test_warc_pages_are_scraped(site, tmp_path):
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    pages = [site.url + "gallery/1.html", site.url + "gallery/2.html"]
    path = tmp_path / "crawl.warc.gz"
    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        for url in pages:
            body = urllib.request.urlopen(url, timeout=10).read()
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
            writer.write_record(
                writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=headers)
            )
    out = tmp_path / "ds"
    run("scrape", "--warc", str(path), "--out", str(out), "--allow-private-network", "--image-size", "32")
    m = read_manifest(str(out))
    on_pages = [r for r in site.ground_truth_rows() if r["page_url"] in pages]
    want = {(r["sha256"], r["alt"]) for r in on_pages if r["kind"] == "content" and r["allowed"] and r["fetchable"]}
    df = shards.read_parquet(str(out))
    ok = df[df.status == "success"]
    assert want and want <= set(zip(ok.sha256, ok.caption, strict=True))
    assert set(df["page_url"]) <= set(pages)
    assert m["extraction"].get("placeholder_alt", 0) + m["extraction"].get("no_alt", 0) > 0
