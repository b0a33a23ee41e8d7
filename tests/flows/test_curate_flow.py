"""curate_flow under a real (test-harness) Prefect server: passes as tasks, manifest, artifacts, resume."""

import os

import pytest

from tests.pipeline.curate.helpers import jpeg, make_tiny_clip, write_dataset


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    model = make_tiny_clip(str(root / "model"))
    cols = [(220, 30, 30), (30, 220, 30), (30, 30, 220)]
    shards = [
        [{"key": f"{s:06d}{i:06d}", "jpg": jpeg(cols[(s + i) % 3], noise_seed=10 * s + i), "caption": f"tile {s} {i}"}
         for i in range(9)]
        for s in range(3)
    ]  # fmt: skip
    shards[1][4]["jpg"] = shards[0][1]["jpg"]
    src = write_dataset(str(root / "src"), shards)
    return root, src, model


def test_curate_flow_writes_manifest_report_and_artifacts(harness, data):
    from prefect.client.orchestration import get_client

    from flows.curate import run_curate
    from pipeline.manifest import read_manifest
    from pipeline.shards import read_parquet

    root, src, model = data
    dst = str(root / "out")
    m = run_curate(src, dst, model, keep_fraction=0.6, report=True)
    assert m["stage"] == "curate" and m["clip"]["clip_model"] == "local-dir:" + os.path.abspath(model)
    assert m["filter_order"][-1] == "low_clip_score" and m["threshold_rule"]["keep_fraction"] == 0.6
    assert read_manifest(dst)["samples"] == m["samples"] == m["stats"]["kept"]
    assert m["stats"]["seen"] == 27 and m["stats"]["dropped"]["exact_duplicate"] == 1
    assert len(read_parquet(dst)) == 27
    assert os.path.isfile(os.path.join(dst, "review", "index.html"))

    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["curate-funnel", "curate-summary"]))
        )
    kinds = {a.key: a for a in arts}
    assert set(kinds) == {"curate-funnel", "curate-summary"}
    assert "review/index.html" in kinds["curate-summary"].data and "low_clip_score" in str(kinds["curate-funnel"].data)

    # a rerun reuses the stored scores and the done shards: same decisions, same shards
    m2 = run_curate(src, dst, model, keep_fraction=0.6, report=False)
    assert [s["sha256"] for s in m2["shards"]] == [s["sha256"] for s in m["shards"]]


def test_cli_previous_writes_the_report_and_a_bad_one_fails_before_scoring(data):
    import subprocess
    import sys

    from tests.flows.test_scrape_flow import ROOT

    root, src, model = data

    def curate(*args):
        cmd = [sys.executable, "-m", "flows.cli", "curate", src, "--clip", f"local-dir:{model}", *args]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)

    p = curate("--out", str(root / "cli-v2"), "--previous", str(root / "missing"))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "--previous" in lines[0] and "no manifest.json" in lines[0], p.stderr
    assert not os.path.exists(root / "cli-v2" / "manifest.json")  # refused before anything was scored
    # a failure inside the flow: one error line, Prefect's traceback kept in a file instead of on the terminal
    bad = [sys.executable, "-m", "flows.cli", "curate", src, "--clip", str(root / "no-such-model"), "--out", "x"]
    p = subprocess.run(
        bad,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PREFECT_HOME": str(root / "home")},
    )
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 1 and "Traceback" not in p.stderr and len(errors) == 1, p.stderr
    assert "cannot load CLIP model" in errors[0] and "Available:" not in errors[0]  # no list of every model name
    log = errors[0].rsplit("(traceback: ", 1)[1].rstrip(")")
    assert log == str(root / "home" / "last-failure.log") and "Traceback" in open(log, encoding="utf-8").read()
    p = curate("--out", str(root / "cli-v1"), "--keep-fraction", "0.5")
    assert p.returncode == 0, p.stderr[-2000:]
    assert not os.path.exists(root / "cli-v1" / "review" / "index.html")  # the CLI's default: no report
    p = curate("--out", str(root / "cli-v2"), "--previous", str(root / "cli-v1"))  # no --report given
    assert p.returncode == 0, p.stderr[-2000:]
    html = open(root / "cli-v2" / "review" / "index.html", encoding="utf-8").read()
    assert "No previous version given" not in html and "data-stat='diff.entered'" in html
