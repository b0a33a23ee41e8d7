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
