"""The early-started Prefect temporary server: started before prefect is imported, used by flows, never left behind.

Each case runs in a fresh interpreter: the point is what happens before prefect is imported, and pytest's own
process has imported it long ago.
"""

import json
import os
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# starts the server, runs a real flow against it, and reports what it saw
SCRIPT = """
import json, os
from flows import tempserver
started = tempserver.start()
url = os.environ.get("PREFECT_API_URL")
out = {"started": started, "url": url, "pid": tempserver._proc.pid if tempserver._proc else None}
if started and os.environ.get("JUST_START"):  # the port is ours before the server answers
    import socket
    socket.create_connection(("127.0.0.1", tempserver._port), timeout=2).close()
    out["reserved"] = True
elif started:
    tempserver.wait()
    from prefect import flow
    from prefect.settings import PREFECT_API_URL

    @flow
    def add(a, b):
        return a + b

    out["flow"] = add(2, 3)
    out["prefect_url"] = PREFECT_API_URL.value()
print(json.dumps(out))
"""


def run(tmp_path, env_extra=None, cwd=None, drop=("PREFECT_API_URL",)):
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update({"PREFECT_HOME": str(tmp_path / "home"), "PYTHONPATH": ROOT, **(env_extra or {})})
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=cwd or tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_server_starts_before_prefect_and_stops_at_exit(tmp_path):
    out = run(tmp_path)
    assert out["started"] and out["url"].startswith("http://127.0.0.1:") and out["url"].endswith("/api")
    assert out["flow"] == 5 and out["prefect_url"] == out["url"]  # the flow ran against the early server
    assert (tmp_path / "home" / "prefect.db").is_file()
    assert not alive(out["pid"])  # stopped when the interpreter exited
    try:
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(out["url"] + "/health", timeout=2)
        answered = True
    except OSError:
        answered = False
    assert not answered


def test_a_profile_without_server_settings_still_gets_the_early_server(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "profiles.toml").write_text(
        'active = "ephemeral"\n[profiles.ephemeral]\nPREFECT_SERVER_EPHEMERAL_ENABLED = "true"\n'
    )
    out = run(tmp_path, {"JUST_START": "1"})
    assert out["started"] and out["reserved"]
    assert not alive(out["pid"])


def test_the_server_dies_with_a_killed_command(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update({"PREFECT_HOME": str(tmp_path / "home"), "PYTHONPATH": ROOT})
    code = (
        "import os, signal\nfrom flows import tempserver\nassert tempserver.start()\ntempserver.wait()\n"
        "print(tempserver._proc.pid, flush=True)\nos.kill(os.getpid(), signal.SIGKILL)  # no exit handler runs\n"
    )
    argv = [sys.executable, "-c", code]
    p = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == -9, p.stderr[-2000:]
    pid = int(p.stdout.split()[0])
    deadline = time.monotonic() + 15
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid)  # the kernel sent it SIGTERM when its parent died


def test_a_configured_server_is_left_to_prefect(tmp_path):
    out = run(tmp_path, {"PREFECT_API_URL": "http://127.0.0.1:9/api"}, drop=())
    assert out == {"started": False, "url": "http://127.0.0.1:9/api", "pid": None}
    for key in ("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "PREFECT_SERVER_EPHEMERAL_ENABLED"):
        out = run(tmp_path, {key: "false"})
        assert out["started"] is False and out["url"] is None
    # an API URL in the active profile, or in a prefect.toml of the working directory
    (tmp_path / "home").mkdir(exist_ok=True)
    (tmp_path / "home" / "profiles.toml").write_text(
        'active = "work"\n[profiles.work]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n'
    )
    assert run(tmp_path)["started"] is False
    (tmp_path / "home" / "profiles.toml").write_text(
        'active = "local"\n[profiles.local]\nPREFECT_SERVER_EPHEMERAL_ENABLED = "false"\n'
    )
    assert run(tmp_path)["started"] is False
    (tmp_path / "home" / "profiles.toml").unlink()
    # settings files of the working directory, in any of the forms Prefect reads
    for i, (name, text) in enumerate(
        [
            ("prefect.toml", '[api]\nurl = "http://127.0.0.1:9/api"\n'),
            ("prefect.toml", 'api.url = "http://127.0.0.1:9/api"\n'),
            ("pyproject.toml", '[project]\nname = "x"\n[tool.prefect]\napi.url = "http://127.0.0.1:9/api"\n'),
            ("pyproject.toml", '[tool.prefect.api]\nurl = "http://127.0.0.1:9/api"\n'),
            (".env", "PREFECT_API_URL=http://127.0.0.1:9/api\n"),
            (".env", "PREFECT_SERVER_EPHEMERAL_ENABLED=false\n"),
        ]
    ):
        work = tmp_path / f"project-{i}"
        work.mkdir()
        (work / name).write_text(text)
        assert run(tmp_path, cwd=work)["started"] is False, (name, text)


def test_too_late_once_prefect_is_imported(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update({"PREFECT_HOME": str(tmp_path / "home"), "PYTHONPATH": ROOT})
    code = "import prefect\nfrom flows import tempserver\nprint(tempserver.start(), tempserver._proc)"
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["False", "None"]


def test_dask_runs_leave_the_server_to_prefect():
    # Dask workers may run on other machines, where our loopback URL would point at themselves
    from types import SimpleNamespace

    from flows.tempserver import uses_dask

    assert uses_dask(None, "tcp://10.1.2.3:8786")
    assert uses_dask(SimpleNamespace(task_runner="dask"), None)
    assert not uses_dask(SimpleNamespace(task_runner="process"), None) and not uses_dask(None, None)
