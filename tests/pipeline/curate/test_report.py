"""The review page in headless Chromium: loads without console errors, shows its images, matches the manifest."""

import os
import re
import shutil
import subprocess

import pytest

from pipeline.curate.scorer import load_scorer
from pipeline.curate.stage import curate_dataset
from pipeline.recipe import CurateSection
from tests.pipeline.curate.helpers import COLS, jpeg, make_tiny_clip, write_dataset

CHROMIUM = next(
    (
        p
        for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
        if p and os.path.exists(p)
    ),
    None,
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium: install Debian's chromium (apt-get install chromium) to run the report test"
)
# file:// only; every host name resolves to nothing, so the page cannot reach the network even if it tried
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
         "--no-first-run", "--disable-extensions", "--disable-sync", "--disable-background-networking",
         "--virtual-time-budget=5000"]  # fmt: skip


def chromium(*args, tmp):
    env = {**os.environ, "HOME": str(tmp)}
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'profile'}", *args], capture_output=True,
                          text=True, timeout=90, env=env)  # fmt: skip


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("rep")
    model = make_tiny_clip(str(root / "model"))
    cols = [(220, 30, 30), (30, 220, 30), (30, 30, 220)]
    names = ["red", "green", "blue"]
    samples = [
        {"key": f"000000{i:06d}", "jpg": jpeg(cols[i % 3], noise_seed=i), "caption": f"a {names[i % 3]} tile {i}"}
        for i in range(24)
    ]
    samples[7]["jpg"] = samples[2]["jpg"]
    samples[9]["caption"] = "logo"
    src = write_dataset(str(root / "src"), [samples[:12], samples[12:]])
    base = dict(
        clip={"model": model},
        workers=0,
        shard_size=8,
        tags=names,
        dedup={"phash_distance": 0, "embedding_threshold": None},
    )
    scorer = load_scorer(model, device="cpu")
    prev = curate_dataset(src, str(root / "v1"), CurateSection(**base, keep_fraction=0.5, report=False), scorer)
    dst = str(root / "v2")
    m = curate_dataset(
        src, dst, CurateSection(**base, keep_fraction=0.8, report=True), scorer, previous=str(root / "v1")
    )
    return root, dst, m, prev


def test_page_loads_shows_images_and_matches_the_manifest(report):
    root, dst, m, prev = report
    page = os.path.join(dst, "review", "index.html")
    html = open(page, encoding="utf-8").read()
    assert "http://" not in html.replace("http://example.invalid", "") and "https://" not in html  # nothing remote
    run = chromium("--enable-logging=stderr", "--v=0", "--dump-dom", "file://" + page, tmp=root)
    assert run.returncode == 0, run.stderr[-2000:]
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console
    dom = run.stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    assert 'data-js="ok"' in body
    total = int(re.search(r'data-images-total="(\d+)"', body).group(1))
    ok = int(re.search(r'data-images-ok="(\d+)"', body).group(1))
    assert total >= 10 and ok == total
    stats = dict(re.findall(r"data-stat=['\"]([\w.]+)['\"]>([-\d.]+)<", dom))
    assert int(stats["seen"]) == m["stats"]["seen"] == 24
    assert int(stats["kept"]) == m["stats"]["kept"]
    for f in m["funnel"]:
        assert int(stats[f"dropped.{f['reason']}"]) == f["dropped"] == m["stats"]["dropped"].get(f["reason"], 0)
        assert int(stats[f"alone.{f['reason']}"]) == f["alone"]
    assert float(stats["clip_threshold"]) == pytest.approx(m["clip_threshold"], abs=1e-4)
    from pipeline.shards import read_parquet

    a = set(read_parquet(dst).query("status == 'success'")["key"])
    b = set(read_parquet(str(root / "v1")).query("status == 'success'")["key"])
    assert int(stats["diff.entered"]) == len(a - b) > 0 and int(stats["diff.left"]) == len(b - a)
    for section in ("histogram", "thresholds", "above-cut", "below-cut", "tags", "overlap"):
        assert f'id="{section}"' in dom or f"id='{section}'" in dom, section
    assert 'data-gallery="kept"' in dom and 'data-gallery="exact_duplicate"' in dom
    assert 'slider-out">' in dom and "%" in re.search(r'id="slider-out">([^<]*)<', dom).group(1)
    # at its start the slider reads the applied cut: the pool's samples at or above it are exactly the kept ones
    assert int(re.search(r'id="slider-n">([^<]*)<', dom).group(1)) == m["stats"]["kept"]


def test_screenshot_is_kept_as_an_artifact(report):
    root, dst, _, _ = report
    shot = root / "review.png"
    run = chromium("--hide-scrollbars", "--window-size=1280,2600", f"--screenshot={shot}",
                   "file://" + os.path.join(dst, "review", "index.html"), tmp=root)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_thumbnails_read_a_shard_only_as_far_as_its_last_wanted_sample(tmp_path, monkeypatch):
    import pandas as pd

    from pipeline import shards
    from pipeline.curate import report as report_module

    samples = [{"key": f"k{i:03d}", "jpg": jpeg(COLS[i % 4], noise_seed=i), "caption": f"c{i}"} for i in range(40)]
    root = write_dataset(str(tmp_path / "src"), [samples])
    read = []

    def counting(url, *args, **kwargs):
        for s in original(url, *args, **kwargs):
            read.append(s["__key__"])
            yield s

    original = shards.iter_samples
    monkeypatch.setattr(shards, "iter_samples", counting)
    table = pd.DataFrame({"key": [s["key"] for s in samples], "shard": ["000000"] * 40})
    thumbs = report_module.load_thumbnails({"000000": f"{root}/000000.tar"}, table, {"k004", "k011"})
    assert sorted(thumbs) == ["k004", "k011"] and all(v.startswith("data:image/jpeg;base64,") for v in thumbs.values())
    assert read == [f"k{i:03d}" for i in range(12)]  # stopped after k011, not at the shard's 40th sample
