"""A flow run from another process lands in a real ``prefect server start`` on 127.0.0.1."""

import subprocess
import sys
import time

from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.flows.test_scrape_flow import ROOT

SMALL_FLOW = """\
import sys

from prefect import flow, task


@task
def double(x: int) -> int:
    return 2 * x


@flow(name="server-smoke")
def smoke(x: int) -> int:
    return double(x) + 1


if __name__ == "__main__":
    state = smoke(int(sys.argv[1]), return_state=True)
    print("flow_run_id", state.state_details.flow_run_id, state.result())
"""


def test_a_flow_run_reaches_the_server(prefect_server, tmp_path):
    script = tmp_path / "small_flow.py"
    script.write_text(SMALL_FLOW)
    started = time.time()
    p = subprocess.run(
        [sys.executable, str(script), "20"],
        cwd=ROOT,
        env=prefect_server.client_env(str(tmp_path / "client-home")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    ((_, run_id, result),) = [line.split() for line in p.stdout.splitlines() if line.startswith("flow_run_id ")]
    assert result == "41"

    settings = temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url})
    with settings, get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        assert client.read_flow(run.flow_id).name == "server-smoke"
        assert run.parameters == {"x": 20}
        assert run.state.type.value == "COMPLETED"
        assert run.end_time is not None and run.end_time.timestamp() >= started
        tasks = client.read_task_runs()
        assert [(t.flow_run_id, t.state.type.value) for t in tasks] == [(run.id, "COMPLETED")]
