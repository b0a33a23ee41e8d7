"""Fixtures of the flow tests: a real Prefect server on 127.0.0.1."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class PrefectServer:
    """A running ``prefect server start``: its API URL and the environment a client process needs to use it."""

    api_url: str  # http://127.0.0.1:PORT/api
    log: str  # the server's stdout and stderr

    def client_env(self, prefect_home: str) -> dict:
        """os.environ for a subprocess that sends its runs to this server (own home, no telemetry)."""
        env = {**os.environ, "PREFECT_API_URL": self.api_url, "PREFECT_HOME": prefect_home}
        env.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"})
        return env


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    """Whether ``url`` answers 200 now."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process (and the group it leads), then SIGKILL what is left after ``grace`` seconds."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children of the server (uvicorn workers) too
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """``prefect server start`` on 127.0.0.1 and a free port, with its own PREFECT_HOME and telemetry off."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # the only switch that stops the server's heartbeat
            "DO_NOT_TRACK": "1",
            "PREFECT_UI_ENABLED": "false",  # API only: nothing to build
        }
    )
    log = home / "server.log"
    prefect = os.path.join(os.path.dirname(sys.executable), "prefect")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, stopped as one
        )
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 90
        while not healthy(f"{api}/health"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prefect server did not come up on port {port}:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield PrefectServer(api, str(log))
    finally:
        stop(proc)
