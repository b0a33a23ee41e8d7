"""Prefect's temporary API server, started the moment a command begins rather than when its flow first asks.

Without ``PREFECT_API_URL``, Prefect starts a temporary server when a flow's client first needs one: a uvicorn
process that imports the server and answers after 3-4 s, after the command's own imports (1-2 s), so about 7 s
pass before the first download of a scrape. ``start()`` spawns the same server (the same uvicorn command and
environment Prefect's ``SubprocessASGIServer`` uses) before anything imports prefect, and points this process and
every worker it spawns at it through ``PREFECT_API_URL``; ``wait()`` blocks until it answers, just before the flow.
The server is stopped when the command exits, however it exits; a killed command's server is killed with its
process group, as Prefect's own would be.

Nothing starts when the user has configured a server (``PREFECT_API_URL`` in the environment or in a Prefect
settings file) or turned ephemeral mode off: Prefect then does what it always does.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

START_TIMEOUT_S = 90.0  # a fresh PREFECT_HOME migrates its database first (about 15 s on 2 cores)
_PORT_IN_USE = 3  # uvicorn's exit code when its port is taken

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
_proc: subprocess.Popen | None = None
_port: int | None = None


class ServerStartError(RuntimeError):
    """The temporary server exited or did not answer in time."""


def _settings_files() -> list[str]:
    """Where Prefect reads settings besides the environment: the profiles file, prefect.toml, pyproject, .env."""
    home = os.environ.get("PREFECT_HOME") or os.path.join(os.path.expanduser("~"), ".prefect")
    profiles = os.environ.get("PREFECT_PROFILES_PATH") or os.path.join(home, "profiles.toml")
    return [profiles, "prefect.toml", "pyproject.toml", ".env"]


def configured_elsewhere() -> bool:
    """True when Prefect might not want a temporary server: an API URL is set somewhere, or ephemeral mode is off.

    Settings files are scanned for the API URL's names rather than parsed with Prefect's rules, so a mention of
    it anywhere counts: in doubt, Prefect decides as it always does.
    """
    if os.environ.get("PREFECT_API_URL") or os.environ.get("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "").lower() in (
        "0",
        "false",
        "no",
    ):
        return True
    for path in _settings_files():
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        if "PREFECT_API_URL" in text or "ALLOW_EPHEMERAL_MODE" in text or "[api]" in text or "prefect.api]" in text:
            return True
    return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(port: int) -> subprocess.Popen:
    import importlib.util

    # the directory holding the prefect package, found without importing it (that alone takes about 1 s)
    prefect_dir = os.path.dirname(os.path.dirname(importlib.util.find_spec("prefect").origin))
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    argv = [sys.executable, "-m", "uvicorn", "--app-dir", prefect_dir, "--factory"]
    argv += ["prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--log-level", "error", "--lifespan", "on"]
    return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)


def start() -> bool:
    """Spawn the temporary server now and set ``PREFECT_API_URL`` to it; False when Prefect should decide instead.

    Call it before anything imports prefect (the URL must be in the environment when Prefect reads its settings).
    """
    global _proc, _port
    if _proc is not None:
        return True
    if "prefect" in sys.modules or configured_elsewhere():  # too late to redirect it, or not ours to decide
        return False
    _port = _free_port()
    _proc = _spawn(_port)
    atexit.register(stop)
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{_port}/api"
    return True


def wait(timeout: float = START_TIMEOUT_S) -> None:
    """Block until the server answers /health; ServerStartError (one line) when it exits or stays silent."""
    global _proc, _port
    if _proc is None:
        return
    deadline = time.monotonic() + timeout
    while True:
        code = _proc.poll()
        if code == _PORT_IN_USE:  # another process took the port between the probe and uvicorn's bind
            _port = _free_port()
            _proc = _spawn(_port)
            os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{_port}/api"
            continue
        if code is not None:
            raise ServerStartError(f"Prefect's temporary server exited with code {code} while starting")
        try:
            with _DIRECT.open(f"http://127.0.0.1:{_port}/api/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise ServerStartError(f"Prefect's temporary server was silent on 127.0.0.1:{_port} for {timeout:.0f} s")
        time.sleep(0.05)


def stop() -> None:
    """Stop the server (SIGTERM, then SIGKILL after 5 s); safe to call twice."""
    global _proc
    proc, _proc = _proc, None
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
