"""The scrape command end to end on the demo site: real HTTP over loopback, real Prefect runs, kills and resumes."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from pipeline import shards
from pipeline.demo_site import DemoSiteConfig, serve
from pipeline.manifest import read_manifest
from pipeline.plan import load_plan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def altforge(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


@pytest.fixture(scope="module")
def site():
    with serve(DemoSiteConfig(seed=3, n_images=240), port=0) as srv:
        yield srv


def expected_pairs(site):
    rows = site.ground_truth_rows()
    want = {(r["sha256"], r["alt"]) for r in rows if r["kind"] == "content" and r["allowed"] and r["fetchable"]}
    forbidden = {(r["sha256"], r["alt"]) for r in rows if r["sha256"] and not r["allowed"]} - want
    return want, forbidden


def test_scrape_demo_site_recall_and_refusals(site, tmp_path):
    out = tmp_path / "scraped"
    p = altforge(
        "scrape",
        "--site",
        site.url,
        "--allow-private-network",
        "--out",
        str(out),
        "--image-size",
        "64",
        "--shard-size",
        "120",
    )
    stdout, stderr = p.communicate(timeout=240)
    assert p.returncode == 0, stderr[-2000:]
    assert "images/s" in stderr  # live progress
    assert "wrote" in stdout
    df = shards.read_parquet(str(out))
    ok = df[df.status == "success"]
    got = set(zip(ok.sha256, ok.caption, strict=True))
    want, forbidden = expected_pairs(site)
    assert len(want & got) / len(want) >= 0.99
    assert not (forbidden & got)
    assert df["key"].is_unique
    failures = df[df.status != "success"]
    assert failures["status"].str.fullmatch(r"[a-z0-9_]+").all() and failures["error"].notna().all()
    m = read_manifest(str(out))
    plan = load_plan(str(out))
    assert m["stats"]["seen"] == plan["records"] == len(df)
    assert m["stats"]["kept"] == len(ok) == sum(s["samples"] for s in m["shards"])
    assert m["stats"]["seen"] == m["stats"]["kept"] + sum(m["stats"]["dropped"].values())
    for reason in ("no_alt", "placeholder_alt", "page_opt_out"):  # dropped before download, counted
        assert m["extraction"][reason] > 0
    for reason in ("opt_out", "http_404", "dns_error"):  # noai header, missing files, .invalid hosts
        assert m["stats"]["dropped"][reason] > 0
    assert json.loads((out / "sizes.json").read_text()) == {s["name"]: s["samples"] for s in m["shards"]}


def test_loopback_is_refused_without_the_flag(site, tmp_path):
    p = altforge("scrape", "--site", site.url, "--out", str(tmp_path / "o"), "--image-size", "64")
    stdout, stderr = p.communicate(timeout=240)
    assert p.returncode == 0, stderr[-2000:]
    m = read_manifest(str(tmp_path / "o"))
    assert m["samples"] == 0
    assert m["extraction"].get("page_refused_address", 0) >= 1


def temporary_servers(prefect_home) -> dict[int, bytes]:
    """Live Prefect temporary servers (uvicorn running the server app) of ``prefect_home``: pid -> command line."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            if b"prefect.server.api.server:create_app" not in cmdline:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        if f"PREFECT_HOME={prefect_home}".encode() in environ:
            found[int(pid)] = cmdline
    return found


def test_the_early_temporary_server_never_outlives_the_command(site, tmp_path):
    # no PREFECT_API_URL: the command spawns Prefect's temporary server before it imports prefect
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(home)}
    out = tmp_path / "o"
    args = ("scrape", "--site", site.url, "--allow-private-network", "--out", str(out), "--image-size", "32")
    p = altforge(*args, env=env)
    outputs = []
    reader = threading.Thread(target=lambda: outputs.append(p.communicate(timeout=240)))
    reader.start()
    seen = {}
    while reader.is_alive():  # the server the run uses is the early one: handed a bound socket (--fd)
        seen.update(temporary_servers(home))
        time.sleep(0.1)
    ((_, stderr),) = outputs
    assert p.returncode == 0, stderr[-2000:]
    assert read_manifest(str(out))["samples"] > 0
    assert len(seen) == 1 and b"--fd" in next(iter(seen.values()))
    assert temporary_servers(home) == {}
    # a command that fails after the early start still gives one line, and leaves no server behind
    p = altforge(*args, "--incremental", env=env)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "is a plain dataset" in lines[0], stderr
    assert temporary_servers(home) == {}


def test_cli_writes_to_object_storage_with_storage_options(site, s3_bucket, tmp_path):
    url, so = s3_bucket
    out = f"{url}/scraped"
    args = ("scrape", "--site", site.url, "--allow-private-network", "--out", out, "--image-size", "32")
    p = altforge(*args, "--shard-size", "500", "--storage-options", json.dumps(so))
    _, stderr = p.communicate(timeout=240)
    assert p.returncode == 0, stderr[-2000:]
    import fsspec

    m = read_manifest(out, so)  # on the loopback S3 API, through the endpoint the option named
    tars = fsspec.filesystem("s3", **so).glob(out.removeprefix("s3://") + "/*.tar")
    assert m["samples"] > 0 and len(tars) == len(m["shards"]) > 0
    for bad, msg in (("{nope", "not JSON"), ("[1]", "give a JSON object")):
        for cmd in (("scrape", "--site", site.url), ("curate", str(tmp_path), "--clip", "micro")):
            p = altforge(*cmd, "--out", str(tmp_path / "x"), "--storage-options", bad)
            _, stderr = p.communicate(timeout=60)
            lines = stderr.strip().splitlines()
            assert p.returncode == 2 and len(lines) == 1 and f"--storage-options: {msg}" in lines[0], stderr
    enc = subprocess.run(
        [sys.executable, "-m", "flows.encode", out, "--out", str(tmp_path / "lat"), "--vae", "v"]
        + ["--text-encoder", "t", "--storage-options", "[1]"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert enc.returncode == 2 and enc.stderr.strip().splitlines() == [
        "error: --storage-options: give a JSON object, not list"
    ]


def test_bad_input_fails_with_one_line(tmp_path):
    for args, msg in [
        (["scrape", "--out", str(tmp_path)], "give an input"),
        (["scrape", "--url-list", str(tmp_path / "none.parquet"), "--out", str(tmp_path)], "URL list not found"),
        (["scrape", "--site", "http://x.test/", "--warc", "a.warc", "--out", str(tmp_path)], "give one of"),
        (["scrape", "--site", "http://x.test/", "--out", str(tmp_path), "--image-size", "0"], "--image-size"),
        (["scrape", "--site", "http://x.test/", "--out", str(tmp_path), "--resize", "big"], "--resize: Input"),
        (["scrape", "--site", "http://x.test/", "--out", str(tmp_path), "--max-pages", "0"], "--max-pages: Input"),
        # a check across settings has no single field: its own message, not a crash
        (["scrape", "--site", "http://x.test/", "--out", str(tmp_path), "--max-aspect-ratio", "0.5"], "at least 1"),
    ]:
        p = altforge(*args)
        _, stderr = p.communicate(timeout=60)
        assert p.returncode == 2
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and msg in lines[0], stderr


def test_sigkill_mid_run_resumes_without_loss_or_duplicates(site, tmp_path):
    out = tmp_path / "killed"
    args = (
        "scrape",
        "--site",
        site.url,
        "--allow-private-network",
        "--out",
        str(out),
        "--image-size",
        "64",
        "--shard-size",
        "30",
        "--processes",
        "1",
        "--per-host-rate",
        "120",
    )
    p = altforge(*args, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and len(shards.done_shards(str(out))) < 2:
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)  # the CLI and its workers, mid-shard
    p.communicate()
    done_before = shards.done_shards(str(out))
    plan = load_plan(str(out))
    assert 2 <= len(done_before) < len(plan["partitions"])
    before = {n: (out / f"{n}.tar").read_bytes() for n in done_before}

    p = altforge(*args)
    _, stderr = p.communicate(timeout=240)
    assert p.returncode == 0, stderr[-2000:]
    assert load_plan(str(out)) == plan  # the same partitions: keys stay stable
    assert shards.done_shards(str(out)) == [shards.shard_name(p["index"]) for p in plan["partitions"]]
    for n, data in before.items():  # finished shards were skipped, not rewritten
        assert (out / f"{n}.tar").read_bytes() == data
    df = shards.read_parquet(str(out))
    assert len(df) == plan["records"] and df["key"].is_unique
    keys = [s["__key__"] for u in shards.shard_urls(str(out)) for s in shards.iter_samples(u)]
    assert len(keys) == len(set(keys)) == (df.status == "success").sum()
    assert not [f for f in os.listdir(out) if f.startswith(shards.TMP_PREFIX)]
    want, forbidden = expected_pairs(site)
    ok = df[df.status == "success"]
    got = set(zip(ok.sha256, ok.caption, strict=True))
    assert len(want & got) / len(want) >= 0.99 and not (forbidden & got)


def test_worker_killed_mid_shard_is_retried_by_prefect(site, tmp_path):
    import psutil

    out = tmp_path / "retried"
    p = altforge(
        "scrape", "--site", site.url, "--allow-private-network", "--out", str(out), "--image-size", "32",
        "--shard-size", "60", "--processes", "2", "--per-host-rate", "60", start_new_session=True,
    )  # fmt: skip
    victim, deadline = None, time.time() + 180
    while victim is None and time.time() < deadline and p.poll() is None:
        if any(n.startswith(".tmp-") for n in os.listdir(out) if out.exists()) if out.exists() else False:
            workers = [c for c in psutil.Process(p.pid).children(recursive=True)
                       if "spawn_main" in " ".join(c.cmdline())]  # fmt: skip
            victim = workers[0] if workers else None
        time.sleep(0.1)
    assert victim is not None, "no worker process was seen writing a shard"
    victim.kill()  # SIGKILL one stage worker while a shard is half written
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-3000:]
    assert "a worker process died mid-task" in stderr and "is retried" in stderr  # Prefect retried that task
    plan = load_plan(str(out))
    assert shards.done_shards(str(out)) == [shards.shard_name(q["index"]) for q in plan["partitions"]]
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]  # no visible partial shard
    df = shards.read_parquet(str(out))
    assert len(df) == plan["records"] and df["key"].is_unique
