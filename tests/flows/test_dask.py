"""The same recipe on a real Dask LocalCluster (2 worker processes) through prefect-dask: identical shards to the
default runner, and each worker loads the CLIP scorer once however many shard tasks it runs."""

import hashlib
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from pipeline.demo_site import DemoSiteConfig, serve

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as c,
        Client(c) as client,
    ):
        yield c.scheduler_address, client


@pytest.fixture(scope="module")
def site():
    with serve(DemoSiteConfig(seed=7, n_images=110), port=0) as srv:
        yield srv


def recipe(site_url: str, output: str) -> dict:
    return {
        "name": "dasktest",
        "output": output,
        "sources": [{"kind": "site", "urls": [site_url], "max_pages": 100}],
        "scrape": {
            "image_size": 32,
            "resize_mode": "center_crop",
            "shard_size": 30,
            "processes": 2,
            "allow_private_network": True,
        },  # fmt: skip
        "train": [{"kind": "clip", "config": "micro", "data": "scraped", "steps": 3, "batch_size": 16}],
        "curate": {
            "clip": {"model": "micro", "pretrained": "train:clip"},
            "report": False,
            "dedup": {"exact": True, "phash_distance": None, "embedding_threshold": None},
            "workers": 0,
        },
    }


def run(path, *extra) -> str:
    p = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(path), *extra], cwd=ROOT, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p.stdout


TIMINGS = ["fetch_seconds"]  # how long a download took: the only column that may differ between runs


def shard_digests(directory) -> dict:
    """sha256 of every tar, and of every parquet's rows without the timing columns."""
    out = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.endswith(".tar"):
            out[name] = hashlib.sha256(open(path, "rb").read()).hexdigest()
        elif name.endswith(".parquet") and name[0].isdigit():
            rows = pd.read_parquet(path).drop(columns=TIMINGS, errors="ignore")
            out[name] = hashlib.sha256(rows.to_json().encode()).hexdigest()
    return out


def curated_rows(directory) -> list:
    rows = pd.concat([pd.read_parquet(directory / n) for n in sorted(os.listdir(directory)) if n[0].isdigit()
                      and n.endswith(".parquet")])  # fmt: skip
    return sorted(zip(rows["key"], rows["status"], rows["clip_score"].round(4), strict=True))


def test_dask_runs_match_the_default_runner(cluster, site, tmp_path):
    address, client = cluster
    local, dask = tmp_path / "local.yaml", tmp_path / "dask.yaml"
    local.write_text(yaml.safe_dump(recipe(site.url, str(tmp_path / "local"))))
    dask.write_text(yaml.safe_dump(recipe(site.url, str(tmp_path / "dask"))))
    run(local)
    run(dask, "--dask-address", address)
    scraped = shard_digests(tmp_path / "local" / "scraped")
    assert len([n for n in scraped if n.endswith(".tar")]) >= 3
    assert shard_digests(tmp_path / "dask" / "scraped") == scraped  # same bytes, shard by shard
    # curated shards name the CLIP they were scored with (each run trained its own, at its own path)
    assert curated_rows(tmp_path / "dask" / "curated") == curated_rows(tmp_path / "local" / "curated")
    # the per-shard curate tasks ran on the cluster's workers, each loading the scorer once
    loads = client.run(_load_counts)
    clip_loads = [n for counts in loads.values() for name, n in counts.items() if name.startswith("clip:")]
    assert clip_loads and all(n == 1 for n in clip_loads), loads


def _load_counts():
    from flows.workers import load_counts

    return load_counts()


def test_the_per_host_limits_are_shared_out_over_the_clusters_worker_processes(cluster):
    from flows.runners import dask_worker_count
    from pipeline.recipe import ScrapeConfig

    address, _ = cluster
    assert dask_worker_count(address) == 2  # what run_scrape passes as host_share on Dask (was scrape.processes)
    cfg = ScrapeConfig(per_host_rate=2.0, per_host_concurrency=16, processes=8)
    shared = cfg.fetch_config().for_processes(dask_worker_count(address))
    assert (shared.per_host_rate, shared.per_host_concurrency) == (1.0, 8)
