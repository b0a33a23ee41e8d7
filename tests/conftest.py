"""Test-wide setup: no telemetry, no hub, a private Prefect home, loopback-only servers."""

import atexit
import functools
import os
import re
import shutil
import subprocess
import tempfile

# Before anything imports prefect or huggingface_hub.
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
if "PREFECT_HOME" not in os.environ:  # a bare `pytest` run (make and .ci/run set it): a home that goes with the run
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="altforge-prefect-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # as flows/env.py gives every CLI command
os.environ["NO_PROXY"] = "127.0.0.1,localhost"
os.environ["no_proxy"] = "127.0.0.1,localhost"
# Dummy credentials for the loopback S3 server; never real ones.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import pytest  # noqa: E402

from tests.training import ldm_quick_run  # noqa: E402


@functools.cache
def netns_unavailable() -> str | None:
    """Why ``unshare -n`` cannot give a command its own network namespace here; None when it can."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs the unshare and ip commands"
    try:
        done = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare -n failed: {exc}"
    if done.returncode != 0:
        return f"unshare -n not permitted here (needs root or CAP_SYS_ADMIN): {done.stderr.decode().strip()}"
    return None


def in_netns(cmd: list[str]) -> list[str]:
    """``cmd`` run in a fresh network namespace with only loopback up where one is permitted, else ``cmd`` as is.

    For torchrun launches: c10d looks up the name of each peer (a PTR query for 127.0.0.1 to the resolver in
    /etc/resolv.conf, off loopback) even with GLOO_SOCKET_IFNAME=lo. In the namespace that lookup fails at once
    and c10d warns on stderr instead (see ``without_torch_warnings``).
    """
    if netns_unavailable():
        return cmd
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "in_netns", *cmd]


# torch's C++ warnings ("[W1128 16:40:13.379091919 socket.cpp:207] [c10d] The hostname of the client socket cannot
# be retrieved. err=-3"): torch's, not the product's output
TORCH_WARNING = re.compile(r"^\[W\d{4} |\[c10d\]")


def without_torch_warnings(stderr: str) -> list[str]:
    """The non-blank lines of ``stderr`` less torch's own warnings, for tests that count the product's lines."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not TORCH_WARNING.search(ln)]


def pytest_collection_finish(session):
    """test_ldm_quality's quick run (about five minutes of one core) starts now, in the background: the rest of the
    suite leaves a core idle most of the time."""
    ldm_quick_run.start(session)


def pytest_sessionfinish(session):
    ldm_quick_run.stop(session)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server mode) on 127.0.0.1; yields the storage_options for fsspec/s3fs."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    yield {
        "endpoint_url": endpoint,
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "us-east-1"},
    }
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the loopback S3 server; yields (s3 URL prefix, storage_options)."""
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + "-" + os.urandom(3).hex()
    client = boto3.client(
        "s3", endpoint_url=s3_server["endpoint_url"], aws_access_key_id="testing", aws_secret_access_key="testing"
    )
    client.create_bucket(Bucket=name)
    yield f"s3://{name}", s3_server


@pytest.fixture(scope="session", autouse=True)
def stop_prefect_temporary_server():
    """Stop the temporary server that in-process flows started, while pytest's streams are still open.

    Prefect's own exit handler stops it later and logs to a stream pytest has closed by then ("Logging error"), and
    log and event batches still queued then fail against the stopped server ("Error logging to API").
    """
    yield
    import sys

    if "prefect.server.api.server" in sys.modules:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker
        from prefect.server.api.server import SubprocessASGIServer

        for worker in (APILogWorker, EventsWorker):  # what is still queued goes to the server before it stops
            worker.drain_all(timeout=10)
        SubprocessASGIServer().stop()
