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
