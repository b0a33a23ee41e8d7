"""Every entry point turns Prefect's telemetry off before prefect is imported, and keeps Prefect's home local."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_importing_flows_turns_telemetry_off(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DO_NOT_TRACK"))}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "true"  # even an explicit "on" is overridden
    code = (
        "import flows, os, prefect.settings as s;"
        "cur = s.get_current_settings();"
        "print(cur.server.analytics_enabled, os.environ['DO_NOT_TRACK'], os.environ['PREFECT_HOME'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, check=True
    )
    analytics, dnt, home = out.stdout.split()
    assert analytics == "False" and dnt == "1"
    assert home == os.path.join(str(tmp_path), ".prefect")


def test_shell_entry_points_set_the_switches():
    for path in ("Makefile", ".ci/run"):
        text = open(os.path.join(ROOT, path)).read()
        assert "PREFECT_SERVER_ANALYTICS_ENABLED" in text and "false" in text, path
        assert "DO_NOT_TRACK" in text, path
    conftest = open(os.path.join(ROOT, "tests", "conftest.py")).read()
    assert conftest.index("PREFECT_SERVER_ANALYTICS_ENABLED") < conftest.index("import pytest")


def test_import_contracts_hold():
    out = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "lint-imports")], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 kept, 0 broken" in out.stdout


def test_a_users_own_no_proxy_keeps_loopback_out_of_the_proxy(tmp_path):
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    env.update(NO_PROXY="intranet.example", no_proxy="localhost")  # their proxy would get the local server's calls
    code = "import flows, os; print(os.environ['NO_PROXY'], os.environ['no_proxy'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    upper, lower = out.stdout.split()
    assert upper == "intranet.example,127.0.0.1,localhost" and lower == "localhost,127.0.0.1"


def test_one_node_launches_stay_on_loopback(monkeypatch):
    """On one node the ranks meet on 127.0.0.1 and gloo binds the loopback interface, not the address the host's
    name resolves to (which may be a public interface); a user's own GLOO_SOCKET_IFNAME wins."""
    from flows.cli_data import torchrun_prefix
    from flows.env import loopback_gloo

    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    argv = torchrun_prefix(2, 1, None)
    assert "--standalone" not in argv
    assert {"--rdzv-endpoint=127.0.0.1:0", "--local-addr=127.0.0.1", "--nproc-per-node=2"} <= set(argv)
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo"  # Linux's loopback interface
    assert loopback_gloo({"GLOO_SOCKET_IFNAME": "eth1"}) == {"GLOO_SOCKET_IFNAME": "eth1"}
