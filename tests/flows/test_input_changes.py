"""A scrape's input file rewritten at the same path: a rerun is refused in one line, not resumed as the old one."""

import logging
import os
import subprocess
import sys

import pytest
import yaml

import flows.scrape as scrape_flow_module
from flows.stages import StageContext
from pipeline import input_fingerprint
from pipeline import plan as plans
from pipeline.recipe import Recipe, ScrapeConfig
from pipeline.scrape import check_resume
from tests.flows.test_scrape_flow import ROOT

CFG = ScrapeConfig(allow_private_network=True, image_size=16)
FIRST = "http://127.0.0.1:9/a.png\n"  # nothing is fetched: planning reads the list only
REWRITTEN = "http://127.0.0.1:9/b.png\nhttp://127.0.0.1:9/c.png\n"


@pytest.fixture
def plan_inputs(monkeypatch):
    """The flow's planning task as a plain function (its logger outside a flow run is the only thing replaced)."""
    monkeypatch.setattr(scrape_flow_module, "get_run_logger", lambda: logging.getLogger("test"))
    return scrape_flow_module.plan_inputs.fn


def changed_line(out, listing) -> str:
    return f"{out} was planned from other contents of {listing} (it changed since): use another --out"


def test_a_rewritten_list_is_refused_and_a_touched_one_resumes(plan_inputs, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(FIRST)
    sources = [{"kind": "url_list", "path": str(listing)}]
    out = str(tmp_path / "ds")
    plan = plan_inputs(out, sources, CFG.model_dump_json(), None, False)
    assert plan["inputs"] == {str(listing): input_fingerprint.file_fingerprint(str(listing), {})}
    assert plan["inputs"][str(listing)].startswith("sha256:")

    os.utime(listing, (1, 1))  # touched, same bytes: still the list the plan was made from
    assert plan_inputs(out, sources, CFG.model_dump_json(), None, False)["partitions"] == plan["partitions"]
    check_resume(plans.load_plan(out), sources, CFG, out, False)

    listing.write_text(REWRITTEN)
    for attempt in (
        lambda: check_resume(plans.load_plan(out), sources, CFG, out, False),  # the CLI's early check
        lambda: plan_inputs(out, sources, CFG.model_dump_json(), None, False),  # the flow's own
    ):
        with pytest.raises(ValueError) as e:
            attempt()
        assert str(e.value).startswith(changed_line(out, listing)) and "\n" not in str(e.value)
    assert plans.load_plan(out)["records"] == 1  # nothing replanned

    old = {k: v for k, v in plans.load_plan(out).items() if k != "inputs"}  # a plan from before inputs were kept
    check_resume(old, sources, CFG, out, False)  # unknown: resumed as before, not refused
    # an incremental run finishing its unfinished version goes on with its plan (the next version plans anew)
    assert plan_inputs(out, sources, CFG.model_dump_json(), None, False, None, 0, True)["records"] == 1


def test_a_directory_list_that_gains_a_file_is_changed(tmp_path):
    folder = tmp_path / "lists"
    folder.mkdir()
    (folder / "a.txt").write_text(FIRST)
    sources = [{"kind": "url_list", "path": str(folder), "input_format": "txt"}]
    before = input_fingerprint.fingerprint_inputs(sources)
    (folder / "b.txt").write_text(REWRITTEN)
    (folder / "notes.md").write_text("not read by the source")
    after = input_fingerprint.fingerprint_inputs(sources)
    assert input_fingerprint.changed_input(before, after) == str(folder)
    assert input_fingerprint.fingerprint_inputs([{"kind": "url_list", "path": str(tmp_path / "gone.txt")}]) == {}
    assert input_fingerprint.fingerprint_inputs([{"kind": "site", "urls": ["http://127.0.0.1:9/"]}]) == {}


def test_a_big_archive_is_identified_by_size_and_stamp(tmp_path, monkeypatch):
    monkeypatch.setattr(input_fingerprint, "HASH_LIMIT", 10)
    warc = tmp_path / "crawl.warc.gz"
    warc.write_bytes(b"x" * 100)
    os.utime(warc, (5, 5))
    fp = input_fingerprint.file_fingerprint(str(warc), {})
    assert fp.startswith("size:100;stamp:") and "5" in fp
    assert input_fingerprint.fingerprint_inputs([{"kind": "warc", "paths": [str(warc)]}]) == {str(warc): fp}


def cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    cmd = [sys.executable, "-m", "flows.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)


def test_cli_scrape_rerun_after_the_list_changed_is_one_line(plan_inputs, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(FIRST)
    out = str(tmp_path / "ds")
    cfg = ScrapeConfig(allow_private_network=True, image_size=256)
    plan_inputs(out, [{"kind": "url_list", "path": str(listing), "url_col": "url", "caption_col": "caption",
                       "input_format": None}], cfg.model_dump_json(), None, False)  # fmt: skip
    listing.write_text(REWRITTEN)
    done = cli("scrape", "--url-list", str(listing), "--out", out, "--allow-private-network")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + changed_line(out, listing)), done.stderr


def test_a_recipe_run_after_the_list_changed_is_refused_before_it_starts(plan_inputs, tmp_path):
    from flows.run import check_scrape_inputs

    listing = tmp_path / "list.csv"
    listing.write_text("url,caption\nhttp://127.0.0.1:9/a.png,a\n")
    recipe = {
        "name": "lists",
        "output": str(tmp_path / "out"),
        "sources": [{"kind": "url_list", "path": str(listing)}],
        "scrape": {"image_size": 32, "allow_private_network": True},
    }
    r = Recipe.model_validate(recipe)
    dst = str(tmp_path / "out" / "scraped")
    plan_inputs(dst, [s.model_dump() for s in r.sources], r.scrape.model_dump_json(), None, False)
    check_scrape_inputs(r, str(tmp_path / "out"), None)  # unchanged: goes on
    listing.write_text("url,caption\nhttp://127.0.0.1:9/b.png,b\n")
    with pytest.raises(ValueError, match="planned from other contents of"):
        check_scrape_inputs(r, str(tmp_path / "out"), None)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    done = cli("run", str(tmp_path / "recipe.yaml"))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + changed_line(dst, listing)), done.stderr
    # another list in the recipe is a new scrape (the stage moves the old one aside): not refused here
    other = Recipe.model_validate({**recipe, "sources": [{"kind": "url_list", "path": str(tmp_path / "x.csv")}]})
    check_scrape_inputs(other, str(tmp_path / "out"), None)


def test_the_scrape_fingerprint_follows_the_list_contents_and_old_records_stay_current(tmp_path, monkeypatch):
    """The recipe runner's scrape fingerprint covers the list's bytes (so a rebuilt scrape rebuilds what follows);
    a run state recorded before that is still current."""
    from types import SimpleNamespace

    import flows.run as run_module
    import flows.stages as stages

    listing = tmp_path / "list.csv"
    listing.write_text("url,caption\nhttp://127.0.0.1:9/a.png,a\n")
    out = tmp_path / "out"
    r = Recipe.model_validate(
        {"name": "x", "output": str(out), "sources": [{"kind": "url_list", "path": str(listing)}]}
    )
    scraped = []

    def fake_scrape(dst, *args, **kw):  # what a finished scrape leaves, without the network
        os.makedirs(dst, exist_ok=True)
        (out / "scraped" / "manifest.json").write_text("{}")
        scraped.append(dst)
        return {"stats": {"seen": 1, "kept": 1, "dropped": {}}, "shards": []}

    monkeypatch.setattr(scrape_flow_module, "run_scrape", fake_scrape)

    def run() -> str:
        result = SimpleNamespace(skipped=[], metrics={}, datasets={}, ground_truth=None)
        ctx = StageContext(r, str(out), None, None, run_module.RunState(str(out), None), result, "code")
        ctx.log = lambda *a: None
        return stages.scrape_stage(ctx)

    fp_a = run()
    assert len(scraped) == 1 and run() == fp_a and len(scraped) == 1  # current: skipped
    os.utime(listing, (1, 1))
    assert run() == fp_a and len(scraped) == 1  # touched only
    listing.write_text("url,caption\nhttp://127.0.0.1:9/b.png,b\n")
    fp_b = run()
    assert fp_b != fp_a and len(scraped) == 2  # rewritten: scraped again, under another fingerprint

    sources = [s.model_dump(mode="json") for s in r.sources]
    old_fp = run_module.fingerprint("scrape", sources, stages.scrape_identity(r.scrape))
    state = run_module.RunState(str(out), None)
    state.record("scrape", old_fp, str(out / "scraped"), {"images": 1})  # by a run before contents were kept
    assert run() == old_fp and len(scraped) == 2  # still current (the plan's record is what preflight compares)
