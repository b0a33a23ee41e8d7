"""Reruns of a scrape into the same output: resuming, retry rounds after a kill, and the reruns that are refused."""

import concurrent.futures as cf
import json
import logging
import os
import subprocess
import sys

import pytest

import flows.scrape as scrape_flow_module
from pipeline import plan as plans
from pipeline import shards
from pipeline.fetch_thread import BackgroundFetcher
from pipeline.recipe import ScrapeConfig
from pipeline.scrape import check_resume, plan_settings, scrape_shard
from tests.flows.test_scrape_flow import ROOT
from tests.pipeline.badserver import BadServer

CFG = ScrapeConfig(allow_private_network=True, retries=0, image_size=16, resize_mode="pad")


@pytest.fixture
def plan_inputs(monkeypatch):
    """The flow's planning task as a plain function (its logger outside a flow run is the only thing replaced)."""
    monkeypatch.setattr(scrape_flow_module, "get_run_logger", lambda: logging.getLogger("test"))
    return scrape_flow_module.plan_inputs.fn


def scrape_pending(plan: dict, out: str, fetcher) -> None:
    """What the flow does with a plan: every partition whose shard is not done yet, in order."""
    for p in plan["partitions"]:
        if not shards.is_done(out, p["index"]):
            scrape_shard(plans.read_partition(p["url"]), shards.shard_files(out, p["index"])["tar"], CFG, fetcher)


def test_a_retry_round_killed_before_its_manifest_is_not_repeated_and_keeps_the_records(plan_inputs, tmp_path):
    with BadServer() as bad:
        flaky = bad.url("/flaky?fail=1")  # 503 once, then a PNG
        listing = tmp_path / "list.jsonl"
        rows = [{"url": flaky, "caption": "  a red\nbox ", "license": "cc-by"}, {"url": bad.url("/status/404")}]
        listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
        sources = [{"kind": "url_list", "path": str(listing), "extra_cols": ["license"]}]
        out = str(tmp_path / "ds")
        with BackgroundFetcher(CFG.fetch_config()) as fetcher:
            scrape_pending(plan_inputs(out, sources, CFG.model_dump_json(), None, False), out, fetcher)
            # --retry-failed, killed after its shard was published and before the manifest was rewritten
            retry = plan_inputs(out, sources, CFG.model_dump_json(), None, True)
            assert [p["kind"] for p in retry["partitions"]] == ["initial", "retry-1"]
            scrape_pending(retry, out, fetcher)
            # the same command again: the record's newest attempt succeeded, so nothing is attempted twice
            again = plan_inputs(out, sources, CFG.model_dump_json(), None, True)
            scrape_pending(again, out, fetcher)
    assert [p["records"] for p in again["partitions"] if p["kind"] != "initial"] == [1]
    df = shards.read_parquet(out)
    assert (df.status == "success").sum() == 1 and bad.hits("/flaky") == 2
    sample = next(shards.iter_samples(shards.shard_files(out, 1)["tar"]))
    meta = sample["json"]
    assert meta["retry_of"] == "000000000000" and meta["caption"] == "a red box"
    assert meta["alt_raw"] == "  a red\nbox " and meta["license"] == "cc-by"  # as planned, not only url + caption


def test_a_retry_round_killed_midway_is_resumed_not_planned_again(plan_inputs, tmp_path):
    with BadServer() as bad:
        listing = tmp_path / "list.txt"
        listing.write_text("".join(bad.url(f"/flaky?fail=1&i={i}") + "\n" for i in range(3)))
        sources = [{"kind": "url_list", "path": str(listing)}]
        out = str(tmp_path / "ds")
        with BackgroundFetcher(CFG.fetch_config()) as fetcher:
            scrape_pending(plan_inputs(out, sources, CFG.model_dump_json(), None, False), out, fetcher)
            first = plan_inputs(out, sources, CFG.model_dump_json(), None, True)  # killed before its shard
            second = plan_inputs(out, sources, CFG.model_dump_json(), None, True)
            assert second["partitions"] == first["partitions"] and second["retries"] == 1
            scrape_pending(second, out, fetcher)
    df = shards.read_parquet(out)
    assert len(df) == 6 and (df.status == "success").sum() == 3


def test_reruns_that_cannot_continue_the_output_are_refused(tmp_path):
    sources = [{"kind": "url_list", "path": "a.txt"}]
    plan = plans.new_plan([], {}, sources)
    plan["settings"] = plan_settings(CFG)
    check_resume(plan, sources, CFG, "ds", retry_failed=True)  # the same inputs and settings go on
    check_resume(plan, [], CFG, "ds", retry_failed=True)  # --retry-failed alone names no inputs
    with pytest.raises(ValueError, match="planned from other inputs"):
        check_resume(plan, [{"kind": "url_list", "path": "b.txt"}], CFG, "ds", retry_failed=False)
    with pytest.raises(ValueError, match=r"other settings \(image_size 16 -> 32\)"):
        check_resume(plan, sources, CFG.model_copy(update={"image_size": 32}), "ds", retry_failed=False)
    check_resume(plan, sources, CFG.model_copy(update={"processes": 4, "timeout": 60}), "ds", retry_failed=False)
    with pytest.raises(ValueError, match="no earlier scrape to retry"):
        check_resume(None, [], CFG, "ds", retry_failed=True)
    check_resume({"partitions": [], "sources": sources}, sources, CFG, "ds", retry_failed=False)  # older plans

    def cli(*args):
        cmd = [sys.executable, "-m", "flows.cli", "scrape", *args]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ})

    never = cli("--retry-failed", "--out", str(tmp_path / "typo"))
    assert never.returncode != 0 and len(never.stderr.strip().splitlines()) == 1, never.stderr
    assert "no earlier scrape to retry" in never.stderr and not (tmp_path / "typo").exists()  # nothing written
    both = cli("--retry-failed", "--incremental", "--out", str(tmp_path / "v"))
    assert both.returncode != 0 and "does not combine with --incremental" in both.stderr
    assert len(both.stderr.strip().splitlines()) == 1, both.stderr


class _BrokenFetcher:
    """A fetcher whose every second download raises instead of returning a FetchResult (a bug in a fetch path)."""

    def __init__(self, inner):
        self.inner, self.n = inner, 0

    def submit(self, url: str) -> cf.Future:
        self.n += 1
        if self.n % 2:
            return self.inner.submit(url)
        broken: cf.Future = cf.Future()
        broken.set_exception(UnicodeError("label empty or too long"))
        return broken


def test_a_fetch_that_raises_costs_its_record_not_the_shard(tmp_path):
    with BadServer() as bad:
        records = [{"url": bad.url(f"/ok.png?i={i}"), "caption": f"c{i}"} for i in range(4)]
        with BackgroundFetcher(CFG.fetch_config()) as fetcher:
            stats = scrape_shard(records, str(tmp_path / "000000.tar"), CFG, _BrokenFetcher(fetcher))
    df = shards.read_parquet(str(tmp_path))
    assert len(df) == 4 and stats.kept == 2 and stats.dropped == {"fetch_error": 2}
    assert df.loc[df.status == "fetch_error", "error"].str.contains("UnicodeError").all()
