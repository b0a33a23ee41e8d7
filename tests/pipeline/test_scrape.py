"""scrape_shard against a real misbehaving loopback server: every record ends as one row, success or a reason."""

import io
import struct
import zlib
from collections import Counter

import pytest
from PIL import Image

from pipeline import shards
from pipeline.fetch_thread import BackgroundFetcher
from pipeline.recipe import ScrapeConfig
from pipeline.scrape import failed_records, is_transient, sample_key, scrape_shard, split_shard_url
from tests.pipeline.badserver import BadServer


def png_bytes(w, h, color=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(w, h) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 40, 40)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def bomb_png() -> bytes:
    """A tiny PNG whose header declares 60000 x 60000 pixels."""
    small = png_bytes(8, 8)
    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return small[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + small[33:]


CFG = ScrapeConfig(
    image_size=64,
    resize_mode="center_crop",
    allow_private_network=True,
    connect_timeout=1,
    read_timeout=0.5,
    timeout=3,
    retries=1,
    max_body_bytes=2_000_000,
    concurrency=16,
)


@pytest.fixture(scope="module")
def server():
    with BadServer() as srv:
        srv.add("/img/big.jpg", jpeg_bytes(1200, 800), content_type="image/jpeg")
        srv.add("/img/small.png", png_bytes(100, 80), content_type="image/png")
        srv.add("/img/bomb.png", bomb_png(), content_type="image/png")
        data = jpeg_bytes(300, 200)
        srv.add("/img/truncated.jpg", data[: len(data) // 2], content_type="image/jpeg")
        srv.add("/img/corrupt.png", b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 50, content_type="image/png")
        srv.add("/page-as-image.jpg", b"<html><body>hello</body></html>", content_type="text/html")
        yield srv


CASES = [
    ("/img/big.jpg", "success"),
    ("/img/small.png", "success"),
    ("/ok.png", "success"),
    ("/no-content-type.png", "success"),
    ("/wrong-content-type.png", "success"),
    ("/html-as-image.jpg", "not_an_image"),
    ("/page-as-image.jpg", "not_an_image"),
    ("/img/bomb.png", "decompression_bomb"),
    ("/img/truncated.jpg", "truncated"),
    ("/img/corrupt.png", "decode_error"),
    ("/status/404", "http_404"),
    ("/status/500", "http_500"),
    ("/stall?s=5", "stalled"),
    ("/reset", "connection_error"),
    ("/huge?mb=100", "body_too_large"),
    ("/loop/a", "too_many_redirects"),
    ("/redirect-metadata", "refused_address"),
    ("/noai.png", "opt_out"),
    ("/flaky?fail=1", "success"),
]


def test_every_record_ends_in_exactly_one_row_with_a_reason(server, tmp_path):
    records = [
        {"url": server.url(p), "caption": f"caption {i}", "page_url": server.url("/page.html")}
        for i, (p, _) in enumerate(CASES)
    ]
    records.append({"url": "ftp://127.0.0.1/x.png", "caption": "ftp"})
    records.append({"url": "http://127.0.0.1:1/x.png", "caption": "refused port"})
    records.append({"url": server.url("/ok.png"), "caption": "x" * 10_000})
    spoof = (("url", "https://elsewhere.invalid/"), ("sha256", "0" * 64), ("NSFW", "UNLIKELY"))  # list columns
    records.append({"url": server.url("/ok.png"), "caption": "extra columns", "extra": spoof})
    with BackgroundFetcher(CFG.fetch_config()) as fetcher:
        seen_progress = Counter()
        stats = scrape_shard(records, str(tmp_path / "000007.tar"), CFG, fetcher, progress=seen_progress.update)
    df = shards.read_parquet(str(tmp_path))
    assert len(df) == len(records) and df["key"].is_unique
    assert list(df["key"]) == [sample_key(7, i) for i in range(len(records))]
    status = dict(zip(df["key"], df["status"], strict=True))
    for i, (path, expected) in enumerate(CASES):
        assert status[sample_key(7, i)] == expected, path
    n = len(CASES)
    assert status[sample_key(7, n)] == "refused_scheme"
    assert status[sample_key(7, n + 1)] == "robots_unavailable"  # robots.txt unreachable: disallow, for now
    assert status[sample_key(7, n + 2)] == "success"
    assert df.loc[df.status != "success", "error"].notna().all()  # every failure says what happened
    assert stats.seen == len(records) and stats.kept == sum(1 for s in status.values() if s == "success")
    assert sum(stats.dropped.values()) + stats.kept == stats.seen
    assert seen_progress["seen"] == len(records) and seen_progress["kept"] == stats.kept
    samples = list(shards.iter_samples(str(tmp_path / "000007.tar")))
    assert len(samples) == stats.kept
    big = next(s for s in samples if s["json"]["url"].endswith("/img/big.jpg"))
    assert Image.open(io.BytesIO(big["jpg"])).size == (64, 64)
    assert big["json"]["original_width"] == 1200 and len(big["json"]["sha256"]) == 64
    assert big["txt"] == "caption 0"
    long = next(s for s in samples if s["__key__"] == sample_key(7, n + 2))
    assert len(long["txt"]) == 10_000
    extra = next(s for s in samples if s["__key__"] == sample_key(7, n + 3))["json"]
    assert extra["NSFW"] == "UNLIKELY"  # a list's other columns travel with the sample
    assert extra["url"] == server.url("/ok.png") and extra["sha256"] != "0" * 64  # but never replace its own fields
    assert server.hits("/huge") == 1  # not retried: too large is permanent
    assert server.hits("/status/404") == 1 and server.hits("/status/500") == 2  # 5xx retried once


def test_transient_failures_are_retried_into_new_shards(server, tmp_path):
    cfg = CFG.model_copy(update={"retries": 0})
    records = [{"url": server.url(f"/flaky?fail=1&n={i}"), "caption": f"c{i}"} for i in range(3)]
    records.append({"url": server.url("/status/404"), "caption": "gone"})
    with BackgroundFetcher(cfg.fetch_config()) as fetcher:
        scrape_shard(records, str(tmp_path / "000000.tar"), cfg, fetcher)
        retry = failed_records(str(tmp_path))
        assert [r["retry_of"] for r in retry] == [sample_key(0, i) for i in range(3)]  # 404 is permanent
        stats = scrape_shard(retry, str(tmp_path / "000001.tar"), cfg, fetcher)
    assert stats.kept == 3
    assert failed_records(str(tmp_path)) == []
    samples = list(shards.iter_samples(str(tmp_path / "000001.tar")))
    assert sorted(s["json"]["retry_of"] for s in samples) == [sample_key(0, i) for i in range(3)]


def test_helpers():
    assert split_shard_url("s3://b/ds/000012.tar") == ("s3://b/ds", 12)
    with pytest.raises(ValueError):
        split_shard_url("s3://b/ds/12.tar")
    assert is_transient("http_503") and is_transient("timeout") and not is_transient("http_404")
    assert not is_transient("opt_out") and not is_transient("http_5")
