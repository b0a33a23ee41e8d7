"""Worker processes for CPU-bound stages: one pool per run, heavy objects loaded once per worker.

Prefect tasks (one per shard) run on a small thread pool and hand the CPU work to these processes. The worker
processes never import prefect, so no worker starts a Prefect server of its own.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from flows import env  # noqa: F401

_lock = threading.Lock()
_pools: dict[tuple, ProcessPoolExecutor] = {}
_progress_queue = None  # set by the CLI to show live progress

# per-process state, filled by the initializer (or lazily when running inline)
_worker_state: dict = {}
PARENT_CHECK_SECONDS = 1.0  # how often a worker checks that the process that started it is alive


def set_progress_queue(queue) -> None:
    """Route stage progress deltas into ``queue`` (a multiprocessing queue read by the CLI's display)."""
    global _progress_queue
    _progress_queue = queue


def progress_queue():
    """The queue progress deltas go to, or None."""
    return _progress_queue


def _init_worker(state: dict) -> None:
    _worker_state.clear()
    _worker_state.update(state)
    _worker_state["loaded"] = {}
    parent = state.get("parent", os.getppid())  # given by the parent: it may be gone before this runs
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="parent-watch").start()


def _exit_with_parent(parent: int) -> None:
    """End this worker soon after its parent is gone (SIGKILLed, OOM-killed): an orphan would go on writing its
    shard while a rerun writes the same one."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(1)


def worker_object(name: str, factory, *args):
    """A per-process singleton (a fetcher, a model): built by ``factory(*args)`` on first use, then reused. Built
    once even when two task threads ask at once: two fetchers would each keep the per-host rate, doubling it."""
    with _WORKER_OBJECT_LOCK:
        loaded = _worker_state.setdefault("loaded", {})
        if name not in loaded:
            loaded[name] = factory(*args)
            loads = _worker_state.setdefault("loads", {})
            loads[name] = loads.get(name, 0) + 1
        return loaded[name]


_WORKER_OBJECT_LOCK = threading.RLock()  # an RLock: a factory may ask for another worker object


def load_counts() -> dict[str, int]:
    """How many times this process built each worker object (1 each when reuse works)."""
    return dict(_worker_state.get("loads", {}))


def worker_progress(stage: str):
    """The progress callback of this process for ``stage`` (puts its deltas on the run's queue), or None."""
    q = _worker_state.get("queue", _progress_queue)
    return None if q is None else lambda delta: q.put({**delta, "stage": stage})


def get_pool(kind: str, processes: int) -> ProcessPoolExecutor:
    """The process pool for ``kind`` with ``processes`` workers (spawned: safe beside Prefect's threads)."""
    key = (kind, processes)
    with _lock:
        pool = _pools.get(key)
        if pool is None or getattr(pool, "_broken", False):
            ctx = mp.get_context("spawn")
            pool = ProcessPoolExecutor(
                max_workers=processes,
                mp_context=ctx,
                initializer=_init_worker,
                initargs=({"queue": _progress_queue, "parent": os.getpid()},),
            )
            _pools[key] = pool
        return pool


def run(kind: str, processes: int, fn, *args):
    """Run ``fn(*args)`` in the ``kind`` pool (or inline when ``processes`` is 1) and return its result.

    A worker killed mid-shard breaks the pool: the next call (Prefect's retry) gets a fresh one.
    """
    if processes <= 1:
        return fn(*args)
    pool = get_pool(kind, processes)
    try:
        return pool.submit(fn, *args).result()
    except BrokenProcessPool:
        with _lock:
            if _pools.get((kind, processes)) is pool:
                del _pools[(kind, processes)]
        _warn(f"{kind}: a worker process died mid-task; its partial shard stays invisible and the task is retried")
        raise


def _warn(message: str) -> None:
    """A warning in the task's Prefect log (shown by the CLI too), or the module logger outside a run."""
    import logging

    try:
        from prefect import get_run_logger

        get_run_logger().warning(message)
    except Exception:  # no run context (called outside a flow): plain logging
        logging.getLogger(__name__).warning(message)


@atexit.register
def shutdown_pools() -> None:
    """Stop every worker pool."""
    with _lock:
        for pool in _pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        _pools.clear()
