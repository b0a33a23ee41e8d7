"""A scrape's input file rewritten at the same path: a rerun is refused in one line, not resumed as the old one."""

import hashlib
import json
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
    b_list = b"url,caption\nhttp://127.0.0.1:9/b.png,b\n"
    listing.write_bytes(b_list)
    fp_b = run()
    assert fp_b != fp_a and len(scraped) == 2  # rewritten: scraped again, under another fingerprint
    aside = sorted(out.glob("scraped.replaced-*"))  # fp_a's scrape
    listing.rename(tmp_path / "list.csv.bak")  # unreadable now: taken as recorded, the finished scrape stays
    assert run() == fp_b and len(scraped) == 2 and sorted(out.glob("scraped.replaced-*")) == aside
    entry = json.loads((out / "run.json").read_text())["stages"]["scrape"]
    del entry["inputs"]  # a record without them: the plan's are taken
    (out / "run.json").write_text(json.dumps({"stages": {"scrape": entry}}))
    plans.save_plan(str(out / "scraped"), {"inputs": {str(listing): "sha256:" + hashlib.sha256(b_list).hexdigest()}})
    assert run() == fp_b and len(scraped) == 2
    (tmp_path / "list.csv.bak").rename(listing)
    assert run() == fp_b and len(scraped) == 2

    sources = [s.model_dump(mode="json") for s in r.sources]
    old_fp = run_module.fingerprint("scrape", sources, stages.scrape_identity(r.scrape))
    state = run_module.RunState(str(out), None)
    state.record("scrape", old_fp, str(out / "scraped"), {"images": 1})  # by a run before contents were kept
    assert run() == old_fp and len(scraped) == 2  # still current (the plan's record is what preflight compares)


def test_an_input_on_storage_that_is_down_is_unknown_not_a_crash(s3_bucket, monkeypatch):
    """An S3 endpoint that is down (botocore's error) or an HTTP list answering 5xx (aiohttp's) leaves the input out,
    as unknown, like a missing file; anything else is still raised."""
    import socket

    import aiohttp

    prefix, so = s3_bucket
    listing = f"{prefix}/list.csv"
    fs_so = {**so, "config_kwargs": {"retries": {"max_attempts": 1}}}
    from pipeline import storage

    storage.write_bytes(listing, b"url,caption\nhttp://127.0.0.1:9/a.png,a\n", so)
    sources = [{"kind": "url_list", "path": listing}]
    assert set(input_fingerprint.fingerprint_inputs(sources, fs_so, True)) == {listing}
    with socket.socket() as s:  # a port nobody listens on: the endpoint is down
        s.bind(("127.0.0.1", 0))
        down = {**fs_so, "endpoint_url": f"http://127.0.0.1:{s.getsockname()[1]}"}
    assert input_fingerprint.fingerprint_inputs(sources, down, True) == {}

    def answer(error):
        def fingerprint(*args):
            raise error

        monkeypatch.setattr(input_fingerprint, "_path_fingerprint", fingerprint)

    answer(aiohttp.ClientResponseError(None, (), status=503, message="Service Unavailable"))
    assert input_fingerprint.fingerprint_inputs([{"kind": "url_list", "path": "http://127.0.0.1:9/l.csv"}]) == {}
    answer(RuntimeError("a bug"))
    with pytest.raises(RuntimeError):
        input_fingerprint.fingerprint_inputs([{"kind": "url_list", "path": "http://127.0.0.1:9/l.csv"}])


@pytest.fixture
def chunked_server():
    """A loopback HTTP server that answers no HEAD and sends ``BLOCKS`` MiB chunked (its size unknown); yields
    (URL, what it did: the GETs it answered, how many it sent whole)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = {"gets": 0, "whole": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self.send_response(405)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self):
            seen["gets"] += 1
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("ETag", '"e1"')
            self.end_headers()
            try:
                for i in range(BLOCKS):
                    self.wfile.write(b"%x\r\n" % MIB + bytes([i]) * MIB + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
                seen["whole"] += 1
            except OSError:  # the client stopped reading
                pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/CC-MAIN-x.warc.gz", seen
    srv.shutdown()
    srv.server_close()


MIB, BLOCKS = 1 << 20, 48  # more than the kernel's socket buffers hold: a GET not read to its end is never whole


def test_an_http_input_of_unknown_size_is_read_up_to_the_hash_limit_only(chunked_server, monkeypatch):
    monkeypatch.setattr(input_fingerprint, "HASH_LIMIT", 2 * MIB)
    url, seen = chunked_server
    fps = input_fingerprint.fingerprint_inputs([{"kind": "warc", "paths": [url]}], None, True)
    first = hashlib.sha256(bytes([0]) * MIB + bytes([1]) * MIB).hexdigest()
    assert fps == {url: f'partial-sha256:{first};stamp:"e1"'}
    assert seen["gets"] >= 1 and seen["whole"] == 0  # no GET read to the end (not the isdir probe, not the hash)


def test_a_local_hf_folder_leaves_its_dot_folders_out(tmp_path):
    folder = tmp_path / "ds"
    (folder / "data").mkdir(parents=True)
    (folder / ".git").mkdir()
    (folder / "data" / "train.parquet").write_bytes(b"rows")
    (folder / ".git" / "index").write_bytes(b"one")
    sources = [{"kind": "hf_dataset", "name": str(folder)}]
    before = input_fingerprint.fingerprint_inputs(sources)
    (folder / ".git" / "index").write_bytes(b"two")  # a git operation: no data changed
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.lock").write_bytes(b"")
    assert input_fingerprint.fingerprint_inputs(sources) == before
    (folder / "data" / "train.parquet").write_bytes(b"other rows")
    assert input_fingerprint.changed_input(before, input_fingerprint.fingerprint_inputs(sources)) == str(folder)
