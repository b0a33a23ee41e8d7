"""Prefect's temporary API server, started the moment a command begins rather than when its flow first asks.

Without ``PREFECT_API_URL``, Prefect starts a temporary server when a flow's client first needs one: a uvicorn
process that imports the server and answers after 3-4 s, after the command's own imports (1-2 s), so about 7 s
pass before the first download of a scrape. ``start()`` spawns the same server (the same uvicorn app and
environment flags as Prefect's ``SubprocessASGIServer``) before anything imports prefect, on a loopback socket it
has already bound (handed over with ``--fd``, so no other process can take the port meanwhile), and points this
process and the workers it spawns at it through ``PREFECT_API_URL``. ``wait()`` blocks until it answers, just
before the flow. The server stops when the command exits, and on Linux it also gets SIGTERM when the command dies
of a signal (``PR_SET_PDEATHSIG``), so none outlives its command.

Nothing starts when the user may have configured a server or turned ephemeral mode off (environment, profile,
``prefect.toml``, ``[tool.prefect]`` in pyproject, ``.env``; ``configured_elsewhere``), when prefect is already
imported, or when the flow's tasks run on Dask workers, which may be on other machines: Prefect then does what it
always does.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time

START_TIMEOUT_S = 90.0  # a fresh PREFECT_HOME migrates its database first (about 15 s on 2 cores)
_FALSE = ("0", "false", "no", "off")
_EPHEMERAL_KEYS = ("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "PREFECT_SERVER_EPHEMERAL_ENABLED")

_proc: subprocess.Popen | None = None
_port: int | None = None


class ServerStartError(RuntimeError):
    """The temporary server exited or did not answer in time."""


def _ephemeral_off(settings: dict) -> bool:
    return any(str(settings.get(k, "")).strip().lower() in _FALSE for k in _EPHEMERAL_KEYS)


def _profile_decides() -> bool:
    """True when the active profile sets an API URL or turns ephemeral mode off (or cannot be read)."""
    import tomllib

    home = os.environ.get("PREFECT_HOME") or os.path.join(os.path.expanduser("~"), ".prefect")
    path = os.environ.get("PREFECT_PROFILES_PATH") or os.path.join(home, "profiles.toml")
    try:
        with open(path, "rb") as f:
            profiles = tomllib.load(f)
    except FileNotFoundError:
        return False
    except (OSError, tomllib.TOMLDecodeError):
        return True  # in doubt, Prefect decides
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    settings = profiles.get("profiles", {}).get(active, {})
    return not isinstance(settings, dict) or "PREFECT_API_URL" in settings or _ephemeral_off(settings)


def configured_elsewhere() -> bool:
    """True when Prefect might not want a temporary server: an API URL may be set, or ephemeral mode may be off.

    The environment and the active profile are read exactly. Any ``prefect.toml``, any ``[tool.prefect`` table in
    ``pyproject.toml`` and any ``.env`` naming an API URL or ephemeral setting in the working directory count as
    configured without parsing them Prefect's way: in doubt, Prefect decides, as it always does.
    """
    if os.environ.get("PREFECT_API_URL") or _ephemeral_off(os.environ) or _profile_decides():
        return True
    if os.path.exists("prefect.toml"):
        return True
    for path, marks in (("pyproject.toml", ("[tool.prefect",)), (".env", ("PREFECT_API_URL", *_EPHEMERAL_KEYS))):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        if any(m in text for m in marks):
            return True
    return False


def _die_with_parent() -> None:  # in the child, before exec: SIGTERM when the command's process dies
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the exit handler alone stops the server
        pass


def _spawn(sock: socket.socket) -> subprocess.Popen:
    import importlib.util

    # the directory holding the prefect package, found without importing it (that alone takes about 1 s)
    prefect_dir = os.path.dirname(os.path.dirname(importlib.util.find_spec("prefect").origin))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update({"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"})
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"  # as flows.env sets it; never the server's heartbeat
    fd = sock.fileno()
    argv = [sys.executable, "-m", "uvicorn", "--app-dir", prefect_dir, "--factory"]
    argv += ["prefect.server.api.server:create_app", "--fd", str(fd), "--log-level", "error", "--lifespan", "on"]
    return subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        pass_fds=(fd,),
        preexec_fn=_die_with_parent,  # noqa: PLW1509
        # its own session: a Ctrl-C in the terminal interrupts the command, which then stops the server itself;
        # in the terminal's process group the server died at once and the command retried against it for minutes
        start_new_session=True,
    )


def uses_dask(runtime, dask_address: str | None) -> bool:
    """Whether a recipe run's tasks go to Dask workers, which need a server they can reach (not our loopback one)."""
    return bool(dask_address) or getattr(runtime, "task_runner", None) == "dask"


def start() -> bool:
    """Spawn the temporary server now and set ``PREFECT_API_URL`` to it; False when Prefect should decide instead.

    Call it before anything imports prefect (the URL must be in the environment when Prefect reads its settings).
    """
    global _proc, _port
    if _proc is not None:
        return True
    if "prefect" in sys.modules or configured_elsewhere():  # too late to redirect it, or not ours to decide
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # bound here: the port is ours from now on
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        _port = sock.getsockname()[1]
        _proc = _spawn(sock)
    atexit.register(stop)
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{_port}/api"
    return True


def wait(timeout: float = START_TIMEOUT_S) -> None:
    """Block until the server answers /health; ServerStartError (one line) when it exits or stays silent."""
    if _proc is None:
        return
    import http.client  # here, not at the top: every CLI command imports this module, --help included
    import urllib.error
    import urllib.request

    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    deadline = time.monotonic() + timeout
    while True:
        code = _proc.poll()
        if code is not None:
            raise ServerStartError(f"Prefect's temporary server exited with code {code} while starting")
        try:
            with direct.open(f"http://127.0.0.1:{_port}/api/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError, http.client.HTTPException):
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
