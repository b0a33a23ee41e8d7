"""recipe_flow end to end: web page to trained diffusion model in one Prefect run, skipped stages on rerun,
a SIGKILLed run resumed, and the same recipe with every dataset on an S3 API served on 127.0.0.1."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from PIL import Image

from pipeline.manifest import read_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGES = ["scrape", "train clip", "curate", "train vae", "encode", "train ldm", "generate"]


def tiny_recipe(output: str, **extra) -> dict:
    """Every stage, at sizes that run in about a minute on two cores."""
    return {
        "name": "tiny",
        "output": output,
        "sources": [{"kind": "demo_site", "seed": 5, "images": 90}],
        "scrape": {
            "image_size": 32,
            "resize_mode": "center_crop",
            "shard_size": 50,
            "processes": 1,
            "concurrency": 16,
            "allow_private_network": True,
        },
        "curate": {
            "clip": {"model": "micro", "pretrained": "train:clip"},
            "keep_fraction": 0.8,
            "report": False,
            "dedup": {"exact": True, "phash_distance": None, "embedding_threshold": None},
            "shard_size": 40,
            "workers": 0,
        },
        "encode": {
            "vae": "train:vae",
            "text_encoder": {"model": "micro", "pretrained": "train:clip"},
            "resolution": 32,
            "batch_size": 32,
        },
        "train": [
            {"kind": "clip", "config": "micro", "data": "scraped", "steps": 4, "batch_size": 16},
            {"kind": "vae", "config": "tiny", "data": "curated", "steps": 4, "batch_size": 8},
            {"kind": "ldm", "config": "tiny", "data": "latents", "steps": 4, "batch_size": 8},
        ],
        "generate": {
            "prompts": ["a red circle", "a blue star"],
            "steps": 2,
            "n": 2,
            "guidance_interval": [200, 999],
            "evaluate": False,
        },
        **extra,
    }


def write_recipe(path, recipe: dict) -> str:
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return str(path)


def altforge(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # a kill reaches the trainers it launched too
    )


def finish(p: subprocess.Popen, timeout: float = 600) -> str:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"exit {p.returncode}\n{out[-3000:]}\n{err[-5000:]}"
    return out


def dataset_summary(url: str, so=None) -> dict:
    """What must be equal between two builds of a dataset: per-shard sample counts and the summed stats."""
    m = read_manifest(url, so)
    return {"shards": [(s["name"], s["samples"]) for s in m["shards"]], "stats": m["stats"]["dropped"]}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One complete run of the tiny recipe (shared by the tests that inspect or rerun it)."""
    base = tmp_path_factory.mktemp("recipe")
    recipe = write_recipe(base / "tiny.yaml", tiny_recipe(str(base / "out")))
    out = finish(altforge("run", recipe))
    return base, recipe, out


def test_run_builds_every_stage_with_lineage(finished_run):
    base, _, stdout = finished_run
    out = base / "out"
    report = json.loads((out / "run_report.json").read_text())
    assert list(report["metrics"]) == STAGES
    assert report["skipped"] == []
    assert report["metrics"]["scrape"]["images"] > 50
    assert report["metrics"]["curate"]["kept"] < report["metrics"]["scrape"]["images"]
    # lineage: model folder -> latents manifest -> curated manifest -> scraped manifest
    index = json.loads((out / "ldm" / "model_index.json").read_text())
    assert index["lineage"]["data"] == str(out / "latents")
    latents = read_manifest(index["lineage"]["data"])
    curated = read_manifest(latents["parent"])
    scraped = read_manifest(curated["parent"])
    assert curated["stage"] == "curate" and scraped["stage"] == "scrape" and scraped["dataset"].endswith("scraped")
    assert latents["samples"] == report["metrics"]["encode"]["latents"]
    grid = out / "samples.png"
    assert grid.is_file() and str(grid) in stdout
    with Image.open(grid) as im:
        assert im.text["guidance_interval"] == "200 999" and json.loads(im.text["prompts"])  # as altforge generate
    for what in ("review report", "TensorBoard logs", "sample grid", "metrics:"):
        assert what in stdout or what == "review report"  # the tiny recipe writes no review report
    assert (out / "run_report.md").read_text().startswith("# Run report: tiny")


def test_rerun_skips_complete_stages(finished_run):
    base, recipe, _ = finished_run
    stdout = finish(altforge("run", recipe))
    assert "skipped (complete and current): " + ", ".join(STAGES) in stdout
    report = json.loads((base / "out" / "run_report.json").read_text())
    assert report["skipped"] == STAGES


def test_killed_run_resumes_to_the_same_manifests(finished_run, tmp_path):
    base, _, _ = finished_run
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(str(tmp_path / "out")))
    p = altforge("run", recipe)
    state = tmp_path / "out" / "run.json"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and p.poll() is None:  # kill once the curate stage is recorded
        if state.is_file() and "curate" in json.loads(state.read_text() or "{}").get("stages", {}):
            break
        time.sleep(0.5)
    assert p.poll() is None, "the run ended before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    stdout = finish(altforge("run", recipe))
    assert "skipped (complete and current): scrape, train clip, curate" in stdout
    for ds in ("scraped", "curated", "latents"):
        assert dataset_summary(str(tmp_path / "out" / ds)) == dataset_summary(str(base / "out" / ds)), ds
    assert (tmp_path / "out" / "ldm" / "model_index.json").is_file()


def test_run_killed_mid_scrape_resumes_against_the_same_site(finished_run, tmp_path):
    """The scrape plans with the demo site's full URLs: a resumed run serves the site on the planned port again."""
    base, _, _ = finished_run
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(str(tmp_path / "out")))
    p = altforge("run", recipe)
    plan = tmp_path / "out" / "scraped" / "_inputs" / "plan.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and p.poll() is None and not plan.is_file():
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    scrape = json.loads((tmp_path / "out" / "run.json").read_text())["stages"]["scrape"]
    assert "started_at" in scrape and "finished_at" not in scrape  # killed mid-scrape
    ports = json.loads((tmp_path / "out" / "scraped" / "demo-sites.json").read_text())
    assert list(ports) == ["0:seed=5:images=90"]
    finish(altforge("run", recipe))
    # the same records and drops as the uninterrupted run: no image lost to a dead port (dns/robots errors)
    assert dataset_summary(str(tmp_path / "out" / "scraped")) == dataset_summary(str(base / "out" / "scraped"))


def test_changed_recipe_reruns_what_it_changes_from_scratch(finished_run, tmp_path):
    """A changed setting reruns its stage and everything after it; their old outputs are moved aside, not resumed."""
    base, _, _ = finished_run
    shutil.copytree(base / "out", tmp_path / "out")  # the finished run, moved: its stages are still current there
    old_ldm = json.loads((tmp_path / "out" / "ldm" / "model_index.json").read_text())
    changed = tiny_recipe(str(tmp_path / "out"))
    changed["curate"]["keep_fraction"] = 0.6
    changed["train"][2]["steps"] = 5
    stdout = finish(altforge("run", write_recipe(tmp_path / "changed.yaml", changed)))
    assert "skipped (complete and current): scrape, train clip" in stdout
    report = json.loads((tmp_path / "out" / "run_report.json").read_text())
    assert report["skipped"] == ["scrape", "train clip"]
    before = read_manifest(str(base / "out" / "curated"))["samples"]
    curated = read_manifest(str(tmp_path / "out" / "curated"))
    assert curated["samples"] < before
    latents = read_manifest(str(tmp_path / "out" / "latents"))
    assert latents["samples"] == curated["samples"]  # encoded afresh, not the old latents under a new parent
    for old in ("latents", "vae", "ldm"):  # what the earlier settings built is kept beside, not deleted
        aside = [d for d in os.listdir(tmp_path / "out") if d.startswith(f"{old}.replaced-")]
        assert len(aside) == 1, (old, os.listdir(tmp_path / "out"))
    aside_ldm = tmp_path / "out" / next(d for d in os.listdir(tmp_path / "out") if d.startswith("ldm.replaced-"))
    assert json.loads((aside_ldm / "model_index.json").read_text()) == old_ldm
    assert report["metrics"]["train ldm"]["steps"] == 5
    # trained from step 0: the old run's final checkpoint (step 4) is not in the new run's folder to resume from
    steps = sorted(d for d in os.listdir(tmp_path / "out" / "ldm" / "checkpoints") if d.startswith("step_"))
    assert steps == ["step_00000005"]
    assert "step_00000004" in os.listdir(aside_ldm / "checkpoints")


def test_every_dataset_on_s3(s3_bucket, tmp_path):
    url, so = s3_bucket
    out = f"{url}/run"
    recipe = tiny_recipe(out, storage_options=so, models=str(tmp_path / "models"))
    recipe["generate"]["prompts"] = ["a green square"]
    stdout = finish(altforge("run", write_recipe(tmp_path / "s3.yaml", recipe)))
    for ds in ("scraped", "curated", "latents"):
        m = read_manifest(f"{out}/{ds}", so)
        assert m["samples"] > 0 and m["dataset"] == f"{out}/{ds}"
    assert read_manifest(f"{out}/latents", so)["parent"] == f"{out}/curated/manifest.json"
    assert (tmp_path / "models" / "ldm" / "model_index.json").is_file()
    assert (tmp_path / "models" / "samples.png").is_file() and "samples.png" in stdout
    assert not (tmp_path / "run").exists()  # nothing fell back to a local directory named like the URL


def test_bad_inputs_fail_at_the_start_with_one_line(tmp_path, s3_server):
    missing = tiny_recipe(str(tmp_path / "out"))
    missing["train"][2]["data"] = str(tmp_path / "nowhere")  # the ldm run (the clip run is what curate uses)
    p = altforge("run", write_recipe(tmp_path / "missing.yaml", missing))
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "no manifest.json there" in err and len(err.strip().splitlines()) == 1, err
    bucket = tiny_recipe("s3://no-such-bucket/run", storage_options=s3_server, models=str(tmp_path / "m"))
    p = altforge("run", write_recipe(tmp_path / "bucket.yaml", bucket))
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "no-such-bucket" in err and len(err.strip().splitlines()) == 1, err
    p = altforge("run", write_recipe(tmp_path / "dask.yaml", tiny_recipe(str(tmp_path / "o"))), "--dask-address",
                 "tcp://127.0.0.1:9")  # fmt: skip
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "unreachable" in err and len(err.strip().splitlines()) == 1, err
