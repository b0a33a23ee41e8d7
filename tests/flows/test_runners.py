"""Preflight checks fail at the start with one clear line; placements map to the right task runners."""

import socket
import time

import pytest

from flows import runners
from flows.runners import Placement, check_dask, check_manifest, check_output, placement_of
from pipeline.recipe import Runtime


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_dask_scheduler_is_one_line():
    address = f"tcp://127.0.0.1:{_free_port()}"  # nothing listens there
    with pytest.raises(RuntimeError) as e:
        check_dask(address, timeout_s=2)
    msg = str(e.value)
    assert "\n" not in msg and address in msg and "unreachable" in msg


def test_missing_bucket_is_one_line(s3_server):
    with pytest.raises(RuntimeError) as e:
        check_output("s3://no-such-bucket-here/run", s3_server)
    msg = str(e.value)
    assert "\n" not in msg and "no-such-bucket-here" in msg


def test_an_endpoint_that_is_down_or_never_answers_is_one_line_and_quick(s3_server, monkeypatch):
    # s3fs's exists() answered False for any error (blaming the bucket), and only after minutes on a hung endpoint
    down = {**s3_server, "endpoint_url": f"http://127.0.0.1:{_free_port()}"}
    with pytest.raises(RuntimeError) as e:
        check_output("s3://some-bucket/run", down)
    assert "\n" not in str(e.value) and "cannot reach the bucket 'some-bucket': Could not connect" in str(e.value)

    silent = socket.socket()  # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    monkeypatch.setitem(runners.CHECK_TIMEOUTS["config_kwargs"], "read_timeout", 1)
    hung = {**s3_server, "endpoint_url": f"http://127.0.0.1:{silent.getsockname()[1]}"}
    started = time.monotonic()
    with pytest.raises(RuntimeError) as e:
        check_output("s3://some-bucket/run", hung)
    silent.close()
    assert "Read timeout" in str(e.value) and "\n" not in str(e.value)
    assert time.monotonic() - started < 10  # one attempt of 1 s: botocore's and s3fs's retries are off here


def test_existing_bucket_and_local_paths_pass(s3_bucket, tmp_path):
    url, so = s3_bucket
    check_output(url + "/run", so)
    check_output(str(tmp_path / "anything"))


def test_missing_manifest_is_one_line(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(RuntimeError) as e:
        check_manifest(str(tmp_path / "half"), what="train clip data")
    assert "\n" not in str(e.value) and "manifest.json" in str(e.value) and "train clip data" in str(e.value)
    (tmp_path / "half" / "manifest.json").write_text("{}")
    check_manifest(str(tmp_path / "half"))


def test_a_scheme_without_its_filesystem_is_one_line():
    for url in ("gs://some-bucket/images", "foo://b/curated"):
        for versioned in (False, True):
            with pytest.raises(RuntimeError) as e:
                check_manifest(url, what="train vae data", versioned=versioned)
            assert str(e.value).startswith(f"train vae data {url}") and "\n" not in str(e.value)


def test_placements():
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    local = placement_of(Runtime())
    assert local.kind == "local" and local.worker_processes(3) == 3
    assert isinstance(local.task_runner(3), ThreadPoolTaskRunner)
    dask = placement_of(Runtime(), dask_address="tcp://127.0.0.1:1")
    assert dask.kind == "dask" and dask.worker_processes(3) == 1
    assert isinstance(dask.task_runner(3), DaskTaskRunner)
    proc = Placement("process")
    assert isinstance(proc.task_runner(2), ProcessPoolTaskRunner) and proc.worker_processes(2) == 1


def test_dask_address_without_port_is_one_line_at_once():
    import time

    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as e:
        check_dask("127.0.0.1")
    assert "missing port" in str(e.value) and "\n" not in str(e.value) and time.monotonic() - t0 < 5


@pytest.mark.parametrize("out", ["", "   ", "out ", "\tout"])
def test_a_blank_or_padded_output_is_refused_before_anything_runs(out):
    with pytest.raises(RuntimeError, match="blank or padded with whitespace") as e:  # `altforge run --out`
        check_output(out)
    assert "\n" not in str(e.value)
    check_output("out")  # a plain local path passes
