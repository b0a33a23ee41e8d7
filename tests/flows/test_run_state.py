"""RunState: a stage resumes only output built under its own fingerprint; other output is moved aside, not lost."""

import shutil

from flows.run import RunState
from pipeline import storage


def test_output_of_another_fingerprint_is_moved_aside_and_started_is_not_finished(tmp_path):
    out = tmp_path / "latents"
    out.mkdir()
    (out / "000000.tar").write_text("built under A")
    state = RunState(str(tmp_path), None)
    assert state.begin("encode", "A", str(out)) is None and (out / "000000.tar").exists()  # nothing recorded: resume
    assert state.current("encode", "A", str(out), str(out / "000000.tar")) is None  # started is not finished
    state.record("encode", "A", str(out), {"latents": 1})
    assert state.current("encode", "A", str(out), str(out / "000000.tar"))["metrics"] == {"latents": 1}

    moved = state.begin("encode", "B", str(out))
    assert moved == str(tmp_path / "latents.replaced-A") and not out.exists()
    assert (tmp_path / "latents.replaced-A" / "000000.tar").read_text() == "built under A"

    out.mkdir()
    (out / "part").write_text("a killed run's part under B")
    reloaded = RunState(str(tmp_path), None)  # the started record survives the kill
    assert reloaded.begin("encode", "B", str(out)) is None and (out / "part").exists()  # same fingerprint: resume
    assert reloaded.begin("encode", "A", str(out)) == str(tmp_path / "latents.replaced-B")
    assert (tmp_path / "latents.replaced-B" / "part").exists() and (tmp_path / "latents.replaced-A").exists()


def test_moved_aside_on_an_object_store(s3_bucket):
    url, so = s3_bucket
    out = f"{url}/state/latents"
    storage.write_bytes(f"{out}/000000.tar", b"old", so)
    state = RunState(f"{url}/state", so)
    state.record("encode", "A", out, {})
    moved = state.begin("encode", "B", out)
    assert moved == f"{out}.replaced-A"
    assert storage.read_bytes(f"{moved}/000000.tar", so) == b"old" and not storage.exists(f"{out}/000000.tar", so)
    assert RunState(f"{url}/state", so).stages["encode"]["fingerprint"] == "B"


def test_a_finished_stage_is_current_under_any_spelling_of_its_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out" / "scraped"
    out.mkdir(parents=True)
    (out / "manifest.json").write_text("{}")
    state = RunState("out", None)
    state.record("scrape", "A", "out/scraped", {})  # a run with a relative output
    done = str(out / "manifest.json")
    for spelling in (str(out), f"file://{out}", "./out/scraped/"):  # the same folder, as --out or file:// spell it
        assert state.current("scrape", "A", spelling, done) is not None, spelling
    assert state.current("scrape", "A", str(tmp_path / "other"), done) is None
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # a rerun from another folder, --out spelled absolute
    again = RunState(str(tmp_path / "out"), None)
    for spelling in (str(out), f"file://{out}"):
        assert again.current("scrape", "A", spelling, done) is not None, spelling
    shutil.copytree(tmp_path / "out", tmp_path / "moved")  # OUT moved or synced elsewhere: still finished there
    moved = RunState(str(tmp_path / "moved"), None)
    assert moved.current("scrape", "A", str(tmp_path / "moved" / "scraped"), done) is not None
    assert moved.current("scrape", "A", str(out), done) is None  # not the recorded place inside OUT
    assert storage.local_path(f"file://{out}") == str(out) and storage.local_path("s3://b/x") == "s3://b/x"
    assert not storage.same_place("s3://b/x", "s3://b/y") and storage.same_place("s3://b/x/", "s3://b/x")


def test_speed_settings_and_unused_models_are_not_fingerprinted_and_older_records_stay_current(tmp_path):
    from types import SimpleNamespace

    from flows.stages import StageContext, curate_identity, scrape_identity
    from pipeline.recipe import CurateSection, ScrapeConfig

    fast, slow = ScrapeConfig(processes=2, concurrency=64, timeout=30), ScrapeConfig(processes=8, per_host_rate=1.0)
    assert scrape_identity(fast) == scrape_identity(slow)  # a full re-scrape for a speed setting, before
    assert scrape_identity(fast) != scrape_identity(ScrapeConfig(image_size=64))  # what the samples are: counted
    curate = {"clip": {"model": "m"}}
    assert curate_identity(CurateSection(**curate, workers=0)) == curate_identity(CurateSection(**curate, workers=4))
    out = tmp_path / "scraped"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    state = RunState(str(tmp_path), None)
    state.record("scrape", "OLD", str(out), {"images": 3})  # recorded before these fingerprints changed
    result = SimpleNamespace(skipped=[], metrics={})
    ctx = StageContext(None, str(tmp_path), None, None, state, result, "code")
    ctx.log = lambda *a: None
    done = str(out / "manifest.json")
    assert ctx.skip("scrape", "NEW", str(out), done) is None
    assert ctx.skip("scrape", "NEW", str(out), done, legacy=("OLD",)) == "OLD"  # current: its downstream too
    assert result.metrics["scrape"] == {"images": 3}
    assert state.begin("scrape", "NEW", str(out), legacy=("OLD",)) is None and out.exists()  # resumed, not moved


def test_a_plain_run_refuses_an_incremental_scrape_root(tmp_path):
    import pytest

    from flows.stages import check_not_versioned

    root = tmp_path / "scraped"
    root.mkdir()
    check_not_versioned(str(root), None)
    (root / "versions.json").write_text('{"versions": []}')
    with pytest.raises(ValueError, match="versions of an incremental scrape.*--incremental") as e:
        check_not_versioned(str(root), None)
    assert "\n" not in str(e.value)


def test_a_demo_sites_port_is_pinned_only_while_a_scrape_is_unfinished(tmp_path):
    import json

    from flows.run import _unfinished_scrape

    plain = tmp_path / "scraped"
    assert _unfinished_scrape(str(plain), None, False) is None
    (plain / "_inputs").mkdir(parents=True)
    (plain / "_inputs" / "plan.json").write_text("{}")
    assert _unfinished_scrape(str(plain), None, False) == str(plain)  # planned with the old port: pinned
    (plain / "manifest.json").write_text('{"shards": []}')
    assert _unfinished_scrape(str(plain), None, False) is None
    root = tmp_path / "versioned"
    (root / "v0001").mkdir(parents=True)
    (root / "v0001" / "manifest.json").write_text(json.dumps({"shards": [], "samples": 0}))
    (root / "versions.json").write_text("{}")
    assert _unfinished_scrape(str(root), None, True) is None  # the next scheduled run takes any free port
    (root / "v0002" / "_inputs").mkdir(parents=True)
    (root / "v0002" / "_inputs" / "plan.json").write_text("{}")
    assert _unfinished_scrape(str(root), None, True).endswith("v0002")  # a killed version resumes on its port
