"""Process environment for every entry point: no telemetry, no hub, a project-local Prefect home.

Imported by ``flows/__init__.py`` before anything imports prefect. Values already set by the user win,
except the two telemetry switches, which are always off.
"""

import os
import socket
import sys


def quiet_environment(prefect_home: str | None = None) -> None:
    """Turn Prefect's telemetry and analytics off and give it a project-local home."""
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"  # the only switch that stops the server heartbeat
    os.environ["DO_NOT_TRACK"] = "1"  # client analytics
    os.environ.setdefault("PREFECT_HOME", prefect_home or os.path.join(os.getcwd(), ".prefect"))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    for name in ("NO_PROXY", "no_proxy"):  # the local Prefect server never through a proxy (urllib reads no_proxy)
        have = [h.strip() for h in os.environ.get(name, "").split(",") if h.strip()]
        os.environ[name] = ",".join([*have, *(h for h in ("127.0.0.1", "localhost") if h not in have)])
    # Prefect's own temporary server (a flow called in-process) gets 20 s to answer by default; a fresh home
    # migrates its database first (about 15 s on 2 cores), so a busy machine missed it now and then
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    # OpenMP threads that spin while waiting made CPU training steps 3-8x slower on a shared machine.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def loopback_gloo(env: dict) -> dict:
    """``env`` with gloo held to the loopback interface (unless already set): on one node, gloo otherwise binds the
    address the host's name resolves to, which may be a public interface."""
    if "GLOO_SOCKET_IFNAME" not in env:
        name = next((n for _, n in socket.if_nameindex() if n.startswith("lo")), None)
        if name:
            return {**env, "GLOO_SOCKET_IFNAME": name}
    return env


def torchrun_worker(module: str) -> list[str]:
    """torchrun's program for workers that run ``python -m module``: this interpreter started as is
    (``--no-python``), not with the ``-u`` torchrun adds. The ranks of a local launch share one pipe, and unbuffered
    Python writes a traceback in pieces that another rank's lines split; without ``-u`` stderr is line-buffered."""
    return ["--no-python", sys.executable, "-m", module]


quiet_environment()
