"""The stage worker pools: a worker whose parent is killed does not live on to write a shard beside a rerun."""

import os
import signal
import subprocess
import sys
import time

from tests.flows.test_scrape_flow import ROOT

SCRIPT = """
import time
from flows import workers
pool = workers.get_pool("test", 2)
for f in [pool.submit(time.sleep, 0.5) for _ in range(2)]:  # both workers up and initialised
    f.result()
busy = [pool.submit(time.sleep, 120) for _ in range(2)]  # and busy, as mid-shard
print(" ".join(str(p) for p in pool._processes), flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for a reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_exit_soon_after_their_parent_is_killed():
    p = subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        pids = [int(x) for x in p.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(pid) for pid in pids)
        os.kill(p.pid, signal.SIGKILL)  # the main process alone, as the OOM killer would
        p.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in pids), "orphaned workers are still running"
    finally:
        p.kill()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_worker_object_is_built_once_when_two_threads_ask_together():
    import threading
    import time

    from flows import workers

    def slow_factory():
        time.sleep(0.2)  # both threads are inside worker_object meanwhile
        return object()

    got = []
    threads = [threading.Thread(target=lambda: got.append(workers.worker_object("two-threads", slow_factory)))
               for _ in range(2)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got[0] is got[1] and workers.load_counts()["two-threads"] == 1  # two fetchers doubled the host's rate


def test_progress_rows_per_stage_and_a_final_newline_off_a_terminal():
    import io

    from rich.console import Console

    from flows.progress import ProgressDisplay

    buf = io.StringIO()
    with ProgressDisplay("run", console=Console(file=buf, force_terminal=False, width=120)) as display:
        display.queue.put({"seen": 35, "kept": 26, "http_404": 2, "stage": "scrape"})
        display.queue.put({"seen": 20, "kept": 20, "stage": "encode"})
        time.sleep(1.0)
    text = buf.getvalue()
    assert "records 35" in text and "kept 26" in text and "records 20" in text and "records 55" not in text
    assert text.endswith("\n") and dict(display.stages["scrape"]) == {"seen": 35, "kept": 26, "http_404": 2}
