"""Incremental scrapes: a growing URL list on the demo site, two runs, each version fetching only what is new."""

import threading
from collections import Counter

import pandas as pd
import pytest

from flows.scrape import run_scrape
from pipeline import shards, storage, versions
from pipeline.demo_site import DemoSiteConfig, DemoSiteServer, build_site
from pipeline.manifest import read_manifest
from pipeline.recipe import ScrapeConfig


class CountingSite:
    """The demo site, counting every request by path (what the scraper really fetched)."""

    def __init__(self, site):
        self.site = site
        self.hits: Counter = Counter()
        self._lock = threading.Lock()

    def respond(self, target, origin):
        with self._lock:
            self.hits[target.split("?", 1)[0]] += 1
        return self.site.respond(target, origin)

    def __getattr__(self, name):
        return getattr(self.site, name)


@pytest.fixture(scope="module")
def server():
    counting = CountingSite(build_site(DemoSiteConfig(seed=11, n_images=60, duplicate_rate=0.3)))
    with DemoSiteServer(counting, port=0) as srv:
        yield srv, counting


def lists(srv):
    """(first list, grown list): the grown one adds new images and new URLs for bytes the first already has."""
    rows = [r for r in srv.ground_truth_rows() if r["kind"] == "content" and r["allowed"] and r["fetchable"]]
    by_sha: dict[str, list[str]] = {}
    for r in rows:
        if r["url"] not in by_sha.setdefault(r["sha256"], []):
            by_sha[r["sha256"]].append(r["url"])
    caption = {r["url"]: r["alt"] for r in rows}
    multi = [urls for urls in by_sha.values() if len(urls) > 1][:2]  # an image that lives at two URLs
    single = [urls[0] for urls in by_sha.values() if len(urls) == 1]
    assert len(multi) == 2 and len(single) >= 22
    first = [u[0] for u in multi] + single[:12] + [srv.url + "images/missing-404.png"]
    grown = first + single[12:22] + [u[1] for u in multi]
    frame = lambda urls: pd.DataFrame({"url": urls, "caption": [caption.get(u, "gone") for u in urls]})  # noqa: E731
    return frame(first), frame(grown)


def path_of(u: str) -> str:
    return "/" + u.split("/", 3)[3]


def image_hits(counting, urls) -> int:
    return sum(counting.hits[path_of(u)] for u in urls)


def attempts(version_url, so=None) -> int:
    """Requests the scraper says it made for a version's records (retries included), from its parquet."""
    rows = [r for u in shards.shard_urls(version_url, so) if u.startswith(version_url + "/")
            for r in pd.read_parquet(u[:-4] + ".parquet", storage_options=so).to_dict("records")]  # fmt: skip
    return sum(int(r["attempts"]) for r in rows)


def scrape(root, list_path, so=None, image_size=32):
    cfg = ScrapeConfig(image_size=image_size, processes=1, shard_size=6, allow_private_network=True)
    src = [{"kind": "url_list", "path": str(list_path)}]
    return run_scrape(root, src, cfg, so, incremental=True)


def own_keys(version_url, so=None) -> set[str]:
    return {s["__key__"] for u in versions.version_shards(version_url, so)[0] if u.startswith(version_url + "/")
            for s in shards.iter_samples(u, so)}  # fmt: skip


def test_two_incremental_runs_fetch_only_what_is_new(server, tmp_path):
    srv, counting = server
    first, grown = lists(srv)
    first.to_csv(tmp_path / "first.csv", index=False)
    grown.to_csv(tmp_path / "grown.csv", index=False)
    root = str(tmp_path / "ds")

    counting.hits.clear()
    m1 = scrape(root, tmp_path / "first.csv")
    assert {u for u in grown["url"] if counting.hits[path_of(u)]} == set(first["url"])  # the first list only
    assert image_hits(counting, grown["url"]) == attempts(versions.version_url(root, 1)) >= len(first) == 15
    assert (m1["version"], m1["parent"], m1["samples"]) == (1, None, 14)
    assert m1["stats"]["dropped"] == {"http_404": 1}
    v1 = versions.version_url(root, 1)

    counting.hits.clear()
    m2 = scrape(root, tmp_path / "grown.csv")
    new = grown["url"][len(first) :]
    assert image_hits(counting, first["url"]) == 0  # nothing the first version tried is fetched again
    assert {u for u in new if counting.hits[path_of(u)]} == set(new) and len(new) == 12  # each new URL
    assert image_hits(counting, new) == attempts(versions.version_url(root, 2))  # and nothing else
    v2 = versions.version_url(root, 2)
    assert m2["version"] == 2 and m2["delta"] and m2["parent"] == "../v0001/manifest.json"
    assert read_manifest(v2)["parent"] == m2["parent"] and read_manifest(v1)["version"] == 1
    assert m2["extraction"] == {"seen_url": 15}
    assert m2["stats"]["dropped"] == {"seen_content": 2}  # new URLs, bytes already stored by version 1
    assert (m2["samples"], m2["total_samples"]) == (10, 24)
    assert min(int(s["name"][:6]) for s in m2["shards"]) == len(m1["shards"])  # indices go on after v1's

    # the union: every image of the grown list exactly once, keys unique across the family
    union = shards.shard_urls(root)
    samples = [s for u in union for s in shards.iter_samples(u)]
    assert len(samples) == len({s["__key__"] for s in samples}) == 24
    assert len({s["json"]["sha256"] for s in samples}) == 24
    assert {s["json"]["url"] for s in samples} == set(grown["url"]) - set(new[-2:]) - {first["url"].iloc[-1]}

    rows = versions.list_versions(root)
    got = [(r["version"], r["parent"], r["samples"], r["samples_added"], r["shards"], r["records"]) for r in rows]
    assert got == [(1, None, 14, 14, 3, 15), (2, 1, 24, 10, 5, 12)]
    assert rows[1]["skipped_seen_url"] == 15 and rows[1]["skipped_seen_content"] == 2
    d = versions.diff_versions(root, 1, 2)
    assert d["added"] == sorted(own_keys(v2)) and len(d["added"]) == 10 and d["removed"] == []

    counting.hits.clear()  # a third run on an unchanged list fetches no image and adds an empty version
    m3 = scrape(root, tmp_path / "grown.csv")
    assert image_hits(counting, grown["url"]) == 0
    assert (m3["version"], m3["samples"], m3["total_samples"], m3["extraction"]) == (3, 0, 24, {"seen_url": 27})

    # another image size would make the root read as a mix of 32 px and 64 px samples: refused, nothing written
    with pytest.raises(Exception, match=r"versions were scraped with other settings \(image_size 32 -> 64\)"):
        scrape(root, tmp_path / "grown.csv", image_size=64)
    assert not storage.exists(versions.version_url(root, 4)) and len(versions.list_versions(root)) == 3


def test_incremental_runs_on_s3(server, tmp_path, s3_bucket):
    srv, counting = server
    prefix, so = s3_bucket
    first, grown = lists(srv)
    first, grown = first.iloc[:5], pd.concat([first.iloc[:5], grown.iloc[-4:]])  # 2 new images, 2 repeated bytes
    first.to_csv(tmp_path / "first.csv", index=False)
    grown.to_csv(tmp_path / "grown.csv", index=False)
    root = f"{prefix}/ds"
    scrape(root, tmp_path / "first.csv", so)
    counting.hits.clear()
    m2 = scrape(root, tmp_path / "grown.csv", so)
    assert image_hits(counting, first["url"]) == 0
    assert image_hits(counting, grown["url"]) == attempts(f"{root}/v0002", so) >= 4
    assert m2["parent"] == "../v0001/manifest.json" and m2["dataset"] == f"{root}/v0002"
    assert shards.shard_urls(f"{root}/v0002", so)[0] == f"{root}/v0001/000000.tar"  # resolved in the bucket
    assert m2["stats"]["dropped"] == {"seen_content": 2} and m2["samples"] == 2
    keys = [s["__key__"] for u in shards.shard_urls(root, so) for s in shards.iter_samples(u, so)]
    assert len(keys) == len(set(keys)) == 7
    assert [r["samples"] for r in versions.list_versions(root, so)] == [5, 7]
    assert versions.diff_versions(root, 1, 2, so)["added"] == sorted(own_keys(f"{root}/v0002", so))
