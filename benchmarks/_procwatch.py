"""Benchmark helpers: a clean offline environment, process-tree CPU/RSS watching, a Prefect server for a run."""

from __future__ import annotations

import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def offline_env(extra: dict | None = None) -> dict:
    """This environment without proxies, with telemetry and hubs off, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(
        no_proxy="*",
        NO_PROXY="*",
        WANDB_MODE="disabled",
        WANDB_DISABLED="true",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        DO_NOT_TRACK="1",
        NO_ALBUMENTATIONS_UPDATE="1",  # albumentations (an img2dataset dependency) asks PyPI for updates on import
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


def machine_info() -> dict:
    """CPU model, core count, memory and kernel, as the report shows them."""
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    free = subprocess.run(["free", "-g"], capture_output=True, text=True).stdout.strip()
    return {"cpu": model, "nproc": os.cpu_count(), "free_g": free, "kernel": platform.release()}


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree(pid: int) -> list[int]:
    kids, out, todo = _children_map(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def _mem_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in kB, zeros if gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


class Watch:
    """Samples a process tree's RSS: the peak of the summed RSS and each process's VmHWM, by phase."""

    def __init__(self, pid: int):
        self.pid = pid
        self.phase = "run"
        self.peak_tree_kb: dict[str, int] = {}
        self.peak_proc_kb: dict[str, int] = {}
        self.main_hwm_kb = 0
        self._last_tree = 0.0
        self._pids = [pid]

    def sample(self) -> None:
        """Take one sample (the tree is re-listed every 0.5 s)."""
        now = time.monotonic()
        if now - self._last_tree > 0.5:
            self._pids = _tree(self.pid)
            self._last_tree = now
        total = 0
        for p in self._pids:
            rss, hwm = _mem_kb(p)
            total += rss
            self.peak_proc_kb[self.phase] = max(self.peak_proc_kb.get(self.phase, 0), rss)
            if p == self.pid:
                self.main_hwm_kb = max(self.main_hwm_kb, hwm)
        self.peak_tree_kb[self.phase] = max(self.peak_tree_kb.get(self.phase, 0), total)


def _first_image_written(out: str) -> bool:
    """Whether a tar in ``out`` (temporary or final) holds more than its first header."""
    try:
        with os.scandir(out) as it:
            return any(".tar" in e.name and e.stat().st_size > 1024 for e in it)
    except OSError:
        return False


def timed_run(cmd: list[str], out: str, env: dict, log: str) -> dict:
    """Run ``cmd`` to the end: wall time, time to the first image, CPU seconds and peak RSS of its process tree."""
    with open(log, "w") as lf:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        watch, first = Watch(proc.pid), None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # usage covers every descendant it waited for
            if pid:
                break
            watch.sample()
            if first is None and _first_image_written(out):
                first = time.monotonic() - t0
            time.sleep(0.05)
        wall = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{cmd[0]} exited {proc.returncode}; log {log}:\n{tail}")
    return {
        "wall_s": wall,
        "first_image_s": first,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": watch.peak_tree_kb.get("run", 0) / 1024,
    }


class PrefectServer:
    """A Prefect API server started before the timed runs (``prefect server start``), as a deployment would have."""

    def __init__(self, home: str):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        env = offline_env({"PREFECT_HOME": home, "PREFECT_UI_ENABLED": "false"})
        prefect = os.path.join(os.path.dirname(sys.executable), "prefect")
        cmd = [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)]
        self.log = open(home + ".log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 120
        while True:
            try:
                with opener.open(f"{self.api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError(f"prefect server did not start; see {home}.log") from None
                time.sleep(0.5)

    def close(self) -> None:
        """Stop the server's process group."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
