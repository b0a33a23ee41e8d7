"""A scheduled (incremental) run whose new version adds no samples reuses the previous version's later stages."""

import json
import os

from tests.flows.test_recipe_flow import altforge, tiny_recipe, write_recipe


def run_incremental(recipe: str) -> str:
    p = altforge("run", recipe, "--incremental")
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, f"exit {p.returncode}\n{out[-3000:]}\n{err[-5000:]}"
    return out + err


def test_an_empty_version_reuses_what_the_version_before_built(tmp_path):
    out = tmp_path / "out"
    recipe = tiny_recipe(str(out))
    path = write_recipe(tmp_path / "tiny.yaml", recipe)
    run_incremental(path)
    v1 = out / "versions" / "v0001"
    assert (v1 / "ldm" / "model_index.json").is_file() and (v1 / "latents" / "manifest.json").is_file()
    v1_state = (v1 / "run.json").read_bytes()
    v1_model_mtime = os.stat(v1 / "ldm" / "model_index.json").st_mtime_ns

    # the same demo site again: every image's bytes are stored already, so v0002 adds no samples
    logs = run_incremental(path)
    v2 = out / "versions" / "v0002"
    assert json.loads((out / "scraped" / "v0002" / "manifest.json").read_text())["samples"] == 0
    assert "v0002 adds no samples: curated data, latents, models and sample grid are v0001's" in logs, logs[-3000:]
    assert f"models in {v1} (v0001's, reused)\n" in logs, logs[-3000:]  # not v0002, which holds no model
    report = json.loads((v2 / "run_report.json").read_text())
    assert report["datasets"]["curate"] == str(v1 / "curated") and report["datasets"]["encode"] == str(v1 / "latents")
    assert report["datasets"]["scrape"].endswith("scraped/v0002")  # the new version: the same data as a whole
    assert {report["artifacts"][f"{k} model"] for k in ("clip", "vae", "ldm")} == {str(v1 / k) for k in
                                                                                  ("clip", "vae", "ldm")}  # fmt: skip
    assert report["artifacts"]["sample grid"] == str(v1 / "samples.png")
    assert set(report["reused"]) == {"curate", "encode", "train clip", "train vae", "train ldm", "generate"}
    assert set(report["reused"].values()) == {"v0001"}
    assert "v0002 adds no samples" in (v2 / "run_report.md").read_text()
    assert f"models: `{v1} (v0001's, reused)`" in (v2 / "run_report.md").read_text()
    state = json.loads((v2 / "run.json").read_text())["stages"]
    assert state["train ldm"]["reused_from"] == "v0001" and state["train ldm"]["output"] == str(v1 / "ldm")
    assert state["train ldm"]["reused_within"] == "ldm"  # found inside v0001 wherever OUT is moved
    assert state["scrape"]["same_data_as"] == "v0001"
    for built in ("curated", "latents", "clip", "vae", "ldm", "samples.png"):  # nothing rebuilt, no model trained
        assert not (v2 / built).exists(), built
    assert (v1 / "run.json").read_bytes() == v1_state  # the earlier version is read, never written
    assert os.stat(v1 / "ldm" / "model_index.json").st_mtime_ns == v1_model_mtime

    # OUT moved; then another setting of a later stage: that stage (and what reads it) is built under the new
    # version, and the rest is still found in v0001, through v0002's records of it
    out = out.rename(tmp_path / "moved")
    v1 = out / "versions" / "v0001"
    recipe = tiny_recipe(str(out))
    recipe["train"][2]["steps"] = 5
    logs = run_incremental(write_recipe(tmp_path / "changed.yaml", recipe))
    v3 = out / "versions" / "v0003"
    assert "v0003 adds no samples: curated data, latents and models are v0001's" in logs, logs[-3000:]
    assert f"models in {v1} (clip, vae: v0001's, reused) and {v3} (ldm)\n" in logs, logs[-3000:]
    report = json.loads((v3 / "run_report.json").read_text())
    assert report["artifacts"]["ldm model"] == str(v3 / "ldm") and report["metrics"]["train ldm"]["steps"] == 5
    assert (v3 / "ldm" / "model_index.json").is_file() and (v3 / "samples.png").is_file()
    assert report["artifacts"]["vae model"] == str(v1 / "vae") and report["datasets"]["encode"] == str(v1 / "latents")
    assert set(report["reused"]) == {"curate", "encode", "train clip", "train vae"}
    assert not (v3 / "curated").exists() and not (v3 / "vae").exists()
