"""One-line errors of the small commands (demo-site, versions), through the real CLI app in-process."""

import json

import pytest
from typer.testing import CliRunner

from flows.cli import app


def run(*args):
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize(
    "args, named",
    [
        (["--images", "10", "--port", "0"], "n_images must be at least 20"),
        (["--port", "70000"], "--port must be 0..65535"),
        (["--port", "0", "--ground-truth", "/proc/nope/gt.jsonl"], "cannot write the ground truth"),
    ],
)
def test_demo_site_bad_options_are_one_line(args, named):
    r = run("demo-site", *args)
    assert r.exit_code == 2
    out = r.output.strip()
    assert named in out and out.startswith("error:") and "\n" not in out and "Traceback" not in out


def test_versions_errors_are_one_line(tmp_path):
    from tests.pipeline.test_versions import two_versions

    root = tmp_path / "ds"
    two_versions(str(root))
    ok = run("versions", str(root), "--storage-options", "{}")
    assert ok.exit_code == 0 and len(ok.output.strip().splitlines()) == 3
    m = json.loads((root / "v0001" / "manifest.json").read_text())
    del m["samples"]
    (root / "v0001" / "manifest.json").write_text(json.dumps(m))
    (root / "versions.json").unlink()  # rebuilt from the manifests, one of which is damaged
    bad = run("versions", str(root))
    assert bad.exit_code == 2 and "lacks 'samples'" in bad.output and "\n" not in bad.output.strip()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_curate_refuses_a_score_cut_that_is_not_a_number(value, tmp_path):
    (tmp_path / "src").mkdir()
    r = run("curate", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--clip", "x", "--min-score", value)
    out = r.output.strip()
    assert r.exit_code == 2 and "--min-score must be a finite" in out and "\n" not in out, out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("out", ["foo://bucket/x", "gs://bucket/x"])  # unknown scheme; gcsfs is not installed
def test_an_output_no_filesystem_can_serve_is_one_line(out, tmp_path):
    from flows.runners import check_output

    urls = tmp_path / "urls.txt"
    urls.write_text("http://127.0.0.1:9/a.jpg\n")
    r = run("scrape", "--url-list", str(urls), "--out", out)
    text = r.output.strip()
    assert r.exit_code == 2 and text.startswith(f"error: {out}") and "\n" not in text, text
    with pytest.raises(RuntimeError, match=out) as e:  # what `altforge run` checks before Prefect starts
        check_output(out)
    assert "\n" not in str(e.value)


def test_an_infinite_option_is_refused_in_one_line(tmp_path):
    urls = tmp_path / "urls.txt"
    urls.write_text("http://127.0.0.1:9/a.jpg\n")
    r = run("scrape", "--url-list", str(urls), "--out", str(tmp_path / "o"), "--timeout", "inf")
    text = r.output.strip()
    assert r.exit_code == 2 and text == "error: --timeout: Input should be a finite number", text


@pytest.mark.parametrize(
    "args, named",
    [
        (["scrape", "--bogus", "1", "--out", "x"], "No such option: --bogus"),
        (["scrape", "--image-size", "abc", "--out", "x"], "Invalid value for '--image-size'"),
        (["versions"], "Missing argument 'dataset'"),
        (["nosuch"], "No such command 'nosuch'"),
        (["train", "ldm", "DATA", "--out", "OUT", "--steps", "abc"], "Invalid value for '--steps'"),
    ],
)
def test_the_console_script_gives_usage_errors_in_one_line(args, named):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=120)
    err = p.stderr.strip()
    assert p.returncode == 2 and err.startswith("error: ") and named in err and "\n" not in err, err
    assert "--help)" in err and "╭" not in err  # where the flags are listed; no usage block and box


def test_trainer_flag_errors_are_one_line_and_the_ldm_trainer_takes_the_other_trainers_names(capsys):
    from training import train_clip, train_ldm, train_vae

    for module in (train_ldm, train_clip, train_vae):
        with pytest.raises(SystemExit) as e:
            module.parse_args(["DATA", "--out", "OUT", "--no-such-flag"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: unrecognized arguments: --no-such-flag"), err
        assert "\n" not in err and "usage:" not in err
    cfg = train_ldm.parse_args(["DATA", "--out", "OUT", "--warmup-steps", "7", "--grad-clip", "0.5"])
    assert (cfg.warmup, cfg.clip_grad) == (7, 0.5)


def test_a_missing_bucket_is_refused_and_never_created(s3_server, tmp_path):
    import boto3

    urls = tmp_path / "urls.txt"
    urls.write_text("http://127.0.0.1:9/a.jpg\n")
    so = json.dumps(s3_server)
    r = run("scrape", "--url-list", str(urls), "--out", "s3://typo-bucket/scraped", "--storage-options", so)
    text = r.output.strip()
    assert r.exit_code == 2 and "bucket 'typo-bucket' does not exist" in text and "\n" not in text, text
    # writes never create a bucket either (s3fs's makedirs did: a typo made a new bucket and the data went there)
    from pipeline import storage

    with pytest.raises(Exception, match="bucket|Bucket"):
        storage.write_bytes("s3://typo-bucket/x/plan.json", b"{}", s3_server)
    client = boto3.client(
        "s3", endpoint_url=s3_server["endpoint_url"], aws_access_key_id="testing", aws_secret_access_key="testing"
    )
    assert "typo-bucket" not in [b["Name"] for b in client.list_buckets()["Buckets"]]


def test_storage_that_cannot_be_reached_is_one_line_in_versions_and_train(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    so = json.dumps({"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s"})
    for args in (
        ["versions", "s3://some-bucket/root", "--storage-options", so],
        ["train", "clip", "s3://some-bucket/data", "--out", str(tmp_path / "run"), "--storage-options", so],
    ):
        r = run(*args)
        text = r.output.strip()
        assert r.exit_code == 2 and "Traceback" not in text and "\n" not in text, (args[0], text)
        assert "storage not accessible: EndpointConnectionError: Could not connect" in text, text


def test_deploy_refuses_before_it_says_it_is_serving(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # never reached: the schedule is refused first
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\noutput: {tmp_path / 'out'}\nsources:\n  - kind: demo_site\n")
    r = run("deploy", str(recipe), "--cron", "0 3 * * * *")
    text = r.output.strip()
    assert r.exit_code == 2 and text.startswith("error: bad schedule") and "\n" not in text, text
