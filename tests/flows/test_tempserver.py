"""The early-started Prefect temporary server: started before prefect is imported, used by flows, never left behind.

Each case runs in a fresh interpreter: the point is what happens before prefect is imported, and pytest's own
process has imported it long ago.
"""

import json
import os
import subprocess
import sys
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# starts the server, runs a real flow against it, and reports what it saw
SCRIPT = """
import json, os
from flows import tempserver
started = tempserver.start()
url = os.environ.get("PREFECT_API_URL")
out = {"started": started, "url": url, "pid": tempserver._proc.pid if tempserver._proc else None}
if started:
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


def test_a_configured_server_is_left_to_prefect(tmp_path):
    out = run(tmp_path, {"PREFECT_API_URL": "http://127.0.0.1:9/api"}, drop=())
    assert out == {"started": False, "url": "http://127.0.0.1:9/api", "pid": None}
    out = run(tmp_path, {"PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "false"})
    assert out["started"] is False and out["url"] is None
    # an API URL in the active profile, or in a prefect.toml of the working directory
    (tmp_path / "home").mkdir(exist_ok=True)
    (tmp_path / "home" / "profiles.toml").write_text(
        'active = "work"\n[profiles.work]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n'
    )
    assert run(tmp_path)["started"] is False
    (tmp_path / "home" / "profiles.toml").unlink()
    work = tmp_path / "project"
    work.mkdir()
    (work / "prefect.toml").write_text('[api]\nurl = "http://127.0.0.1:9/api"\n')
    assert run(tmp_path, cwd=work)["started"] is False


def test_too_late_once_prefect_is_imported(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update({"PREFECT_HOME": str(tmp_path / "home"), "PYTHONPATH": ROOT})
    code = "import prefect\nfrom flows import tempserver\nprint(tempserver.start(), tempserver._proc)"
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["False", "None"]
