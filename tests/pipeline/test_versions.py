"""Dataset versions: delta layout, the union view, the index, seen sets from parquet, content skips, diff, S3."""

import concurrent.futures as cf
import hashlib
import json
import os
from collections import Counter

import pytest

from pipeline import shards, versions
from pipeline.fetch import FetchResult
from pipeline.manifest import build_manifest, read_manifest, write_manifest
from pipeline.plan import skip_seen
from pipeline.stats import StageStats


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def url(i: int) -> str:
    return f"http://127.0.0.1/img/{i}.png"


def write_version(root: str, shard_rows: dict[int, list[tuple]], so=None) -> tuple[versions.NextVersion, dict]:
    """Write the next version of ``root`` the way an incremental scrape does; rows are (i, status)."""
    target = versions.next_version(root, so)
    for index, rows in shard_rows.items():
        with shards.ShardWriter(target.url, index, so) as w:
            st = StageStats(seen=len(rows))
            for pos, (i, status) in enumerate(rows):
                key = f"{index:06d}{pos:06d}"
                row = {"key": key, "url": url(i), "status": status}
                if status == "success":
                    row["sha256"] = sha(f"bytes {i}")
                    w.write({"__key__": key, "txt": f"caption {i}", "json": {"url": url(i)}})
                    st.kept += 1
                else:
                    st.drop(status)
                w.add_row(row)
            w.publish(st)
    m = build_manifest(target.url, "scrape", {}, parent=target.parent, storage_options=so)
    write_manifest(target.url, versions.stamp_manifest(m, target, so), so)
    versions.write_index(target.root, so)
    return target, m


def keys_of(urls, so=None) -> list[str]:
    return [s["__key__"] for u in urls for s in shards.iter_samples(u, so)]


def two_versions(root: str, so=None):
    v1, m1 = write_version(root, {0: [(0, "success"), (1, "success"), (2, "http_404")], 1: [(3, "success")]}, so)
    # v2: shard indices go on after v1's; 4 fails transiently, 5 repeats the bytes of 0 in a real run (not here)
    v2, m2 = write_version(root, {2: [(6, "success"), (7, "success"), (4, "timeout")]}, so)
    return v1, m1, v2, m2


def test_versions_chain_read_as_a_whole_and_indexed(tmp_path):
    root = str(tmp_path / "ds")
    first = versions.next_version(root)
    assert (first.number, first.parent, first.start_index) == (1, None, 0)
    assert first.url == str(tmp_path / "ds" / "v0001")
    v1, m1, v2, m2 = two_versions(root)
    assert (v2.number, v2.start_index) == (2, 2)
    assert v2.parent == str(tmp_path / "ds" / "v0001" / "manifest.json")
    assert m1["version"] == 1 and m1["parent"] is None and not m1["delta"]
    assert m2["version"] == 2 and m2["parent"] == "../v0001/manifest.json" and m2["delta"]  # relative to v0002/
    assert (m2["samples"], m2["total_samples"], m2["total_shards"]) == (2, 5, 3)
    assert read_manifest(v2.url) == json.loads(json.dumps(m2))

    # the union: the parent's shards, then the delta's; a version dir, its manifest and the root all read alike
    want = [f"{v1.url}/000000.tar", f"{v1.url}/000001.tar", f"{v2.url}/000002.tar"]
    assert shards.shard_urls(v2.url) == want
    assert shards.shard_urls(v2.url + "/manifest.json") == want
    assert shards.shard_urls(root) == want
    assert shards.shard_urls(v1.url) == want[:2]
    assert versions.version_shards(root) == (want, [2, 1, 2])
    keys = keys_of(want)
    assert len(keys) == len(set(keys)) == 5
    from training.data import LoaderConfig, make_plan, read_sizes

    assert read_sizes(v2.url) == (want, [2, 1, 2])
    assert make_plan(root, LoaderConfig(batch_size=1, workers=0), 1).samples == 5

    rows = versions.list_versions(root)
    assert [
        (r["version"], r["parent"], r["samples"], r["shards"], r["samples_added"], r["records"]) for r in rows
    ] == [
        (1, None, 3, 2, 3, 4),
        (2, 1, 5, 3, 2, 3),
    ]
    assert all(r["created_at"] and r["code_version"] for r in rows)
    text = versions.format_versions(rows)
    assert text.splitlines()[0].split()[:4] == ["version", "parent", "samples", "shards"]
    assert len(text.splitlines()) == 3

    d = versions.diff_versions(root, 1, 2)
    assert d["added"] == keys_of([want[2]]) and d["removed"] == []
    assert (d["n_added"], d["n_removed"], d["n_common"], d["samples_old"], d["samples_new"]) == (2, 0, 3, 3, 5)
    back = versions.diff(v2.url, v1.url)
    assert back["removed"] == d["added"] and back["added"] == []


def test_seen_sets_come_from_the_ancestors_parquet(tmp_path):
    root = str(tmp_path / "ds")
    _, _, v2, _ = two_versions(root)
    seen = versions.seen_urls(v2.url)
    assert {i for i in range(10) if url(i) in seen} == {0, 1, 2, 3, 6, 7}  # 4 failed transiently: tried again
    assert url(2) in versions.seen_urls(versions.version_url(root, 1))  # a 404 is a final outcome
    stored = versions.stored_content(v2.url)
    assert len(stored) == 5
    assert stored.key_of(sha("bytes 6")) == "000002000000"
    assert stored.key_of(sha("bytes 2")) is None  # the 404 stored nothing

    drops = Counter()
    records = [{"url": url(i), "caption": str(i)} for i in range(9)]
    kept = list(skip_seen(iter(records), seen, drops, versions.SEEN_URL))
    assert [r["url"] for r in kept] == [url(4), url(5), url(8)]
    assert drops == {"seen_url": 6}


class FakeFetcher:
    def __init__(self, bodies):
        self.bodies = bodies
        self.calls = []

    def submit(self, u, kind="image"):
        self.calls.append(u)
        f = cf.Future()
        body = self.bodies.get(u)
        if body is None:
            f.set_result(FetchResult(u, u, "http_404", http_status=404, error="404"))
        else:
            f.set_result(FetchResult(u, u, "success", http_status=200, body=body, attempts=1))
        return f


def test_content_fetcher_turns_stored_bytes_into_drops():
    stored = versions.StoredContent([(sha("old"), "000000000003"), (sha("older"), "000000000001")])
    inner = FakeFetcher({"http://h/a": b"old", "http://h/b": b"new"})
    fetcher = versions.SeenContentFetcher(inner, stored)
    a, b, c = (fetcher.submit(u).result(timeout=5) for u in ("http://h/a", "http://h/b", "http://h/c"))
    assert a.status == versions.SEEN_CONTENT and a.body is None and "000000000003" in a.error
    assert b.ok and b.body == b"new"
    assert c.status == "http_404"
    assert inner.calls == ["http://h/a", "http://h/b", "http://h/c"]
    assert fetcher.bodies is inner.bodies  # everything else is the wrapped fetcher's


def test_unfinished_version_is_resumed_and_plain_datasets_refused(tmp_path):
    root = str(tmp_path / "ds")
    two_versions(root)
    v3 = versions.next_version(root)
    with shards.ShardWriter(v3.url, v3.start_index) as w:  # a run killed after one shard, before its manifest
        w.add_row({"key": "x", "url": url(9), "status": "http_404"})
        w.publish(StageStats(seen=1, dropped={"http_404": 1}))
    again = versions.next_version(root)
    assert again == v3 and again.start_index == 3
    assert [r["version"] for r in versions.list_versions(root)] == [1, 2]  # incomplete: not listed
    assert shards.shard_urls(root)[-1].endswith("v0002/000002.tar")  # nor read

    plain = str(tmp_path / "plain")
    with shards.ShardWriter(plain, 0) as w:
        w.write({"__key__": "k0", "txt": "a"})
        w.add_row({"key": "k0", "url": url(0), "status": "success"})
        w.publish(StageStats(seen=1, kept=1))
    write_manifest(plain, build_manifest(plain, "scrape", {}, parent="elsewhere/manifest.json"))
    with pytest.raises(ValueError, match="plain dataset"):
        versions.next_version(plain)
    assert shards.shard_urls(plain) == [f"{plain}/000000.tar"]  # a lineage parent is not inherited
    with pytest.raises(FileNotFoundError, match="no complete version 7"):
        versions.resolve(root, 7)
    with pytest.raises(FileNotFoundError, match="has no versions"):
        versions.list_versions(str(tmp_path / "empty"))
    d = versions.diff(plain, versions.version_url(root, 1))  # plain datasets diff too (the curation report's case)
    assert d["removed"] == ["k0"] and d["n_added"] == 3


def test_versions_on_s3(s3_bucket):
    prefix, so = s3_bucket
    root = f"{prefix}/family"
    v1, _, v2, m2 = two_versions(root, so)
    assert v2.url == f"{root}/v0002" and v2.parent == f"{root}/v0001/manifest.json"
    want = [f"{root}/v0001/000000.tar", f"{root}/v0001/000001.tar", f"{root}/v0002/000002.tar"]
    assert shards.shard_urls(root, so) == want == versions.version_shards(v2.url, so)[0]
    assert len(set(keys_of(want, so))) == 5
    assert [r["samples"] for r in versions.list_versions(root, so)] == [3, 5]
    assert versions.diff_versions(root, 1, 2, so)["n_added"] == 2
    assert url(4) not in versions.seen_urls(v2.url, so) and url(7) in versions.seen_urls(v2.url, so)
    assert versions.next_version(root, so).start_index == 3


def test_a_moved_or_copied_root_reads_its_own_versions(tmp_path):
    import shutil

    root = tmp_path / "ds"
    two_versions(str(root))
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    (root / "v0001" / "000000.tar").unlink()  # the original changes: the copy must not read it
    own = shards.shard_urls(str(copy / "v0002"))
    assert own == [f"{copy}/v0001/000000.tar", f"{copy}/v0001/000001.tar", f"{copy}/v0002/000002.tar"]
    assert len(keys_of(own)) == 5 and versions.diff_versions(str(copy), 1, 2)["n_common"] == 3
    moved = tmp_path / "moved"
    shutil.move(copy, moved)
    assert shards.shard_urls(str(moved)) == [u.replace(str(copy), str(moved)) for u in own]
    assert [d for d, _ in versions.ancestry(str(moved / "v0002"))] == [str(moved / "v0001"), str(moved / "v0002")]


def test_an_absolute_parent_of_an_older_manifest_still_resolves(tmp_path):
    root = tmp_path / "ds"
    two_versions(str(root))
    m = json.loads((root / "v0002" / "manifest.json").read_text())
    m["parent"] = str(root / "v0001" / "manifest.json")
    (root / "v0002" / "manifest.json").write_text(json.dumps(m))
    assert len(shards.shard_urls(str(root / "v0002"))) == 3


def test_read_parquet_of_a_root_or_version_is_the_version_as_a_whole(tmp_path):
    root = str(tmp_path / "ds")
    two_versions(root)
    assert len(shards.read_parquet(root)) == 7  # every attempted record of v1 (4) and v2 (3)
    assert len(shards.read_parquet(f"{root}/v0002")) == 7 and len(shards.read_parquet(f"{root}/v0001")) == 4


def test_listing_after_a_kill_between_manifest_and_index_shows_the_new_version(tmp_path):
    root = str(tmp_path / "ds")
    two_versions(root)
    target = versions.next_version(root)
    with shards.ShardWriter(target.url, target.start_index) as w:
        w.write({"__key__": "000003000000", "txt": "c"})
        w.add_row({"key": "000003000000", "url": url(9), "status": "success"})
        w.publish(StageStats(seen=1, kept=1))
    m = build_manifest(target.url, "scrape", {}, parent=target.parent)
    write_manifest(target.url, versions.stamp_manifest(m, target))  # killed here: versions.json not rewritten
    assert [r["version"] for r in versions.list_versions(root)] == [1, 2, 3]
    assert versions.list_versions(root)[-1]["samples"] == 6


def test_manifest_and_index_paths_read_like_their_directories(tmp_path, monkeypatch):
    root = tmp_path / "ds"
    two_versions(str(root))
    want = shards.shard_urls(str(root))
    assert shards.shard_urls(str(root / "versions.json")) == want
    monkeypatch.chdir(root / "v0002")
    assert [os.path.abspath(u) for u in shards.shard_urls("manifest.json")] == want


@pytest.mark.parametrize("index", ['{"a": 1}', "[1, 2]", "{"])
def test_a_broken_index_is_a_one_line_error(tmp_path, index):
    root = tmp_path / "ds"
    two_versions(str(root))
    (root / "versions.json").write_text(index)
    with pytest.raises(ValueError) as e:
        versions.list_versions(str(root))
    assert str(e.value).startswith(str(root / "versions.json")) and "\n" not in str(e.value)


def test_one_incremental_writer_at_a_time_on_a_local_root(tmp_path):
    import pytest

    from pipeline.versions import writer_lock

    root = str(tmp_path / "scraped")
    with writer_lock(root):
        second = writer_lock(root)  # a second run meanwhile: both would have written the same version
        with pytest.raises(ValueError, match="another incremental scrape is writing its next version") as e:
            second.__enter__()
        assert "\n" not in str(e.value)
    with writer_lock(root):  # released when the first one ends (or dies: an flock)
        pass
