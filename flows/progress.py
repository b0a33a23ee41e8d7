"""Live progress on a terminal: records done, images/s and failures by reason, fed by a multiprocessing queue."""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
import time
from collections import Counter

from rich.console import Console
from rich.live import Live
from rich.table import Table

SUCCESS_KEYS = ("seen", "kept")


class ProgressDisplay:
    """Reads count deltas (``{"seen": n, "kept": n, reason: n}``, with ``"stage"`` naming the stage that sent them)
    from a queue and renders a row per stage until closed: a recipe run's scrape and encode counts stay apart."""

    def __init__(self, title: str, total: int | None = None, console: Console | None = None):
        self.title = title
        self.total = total
        self.stages: dict[str, Counter] = {}  # stage -> its counts, in the order they started
        self._started: dict[str, float] = {}
        self.queue = mp.get_context("spawn").Queue()
        self.console = console or Console(stderr=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.monotonic()

    def _render(self) -> Table:
        t = Table.grid(padding=(0, 2))
        if not self.stages:  # nothing counted yet, or workers (process, Dask) that have no way to report: no zeros
            t.add_row(f"[bold]{self.title}[/]", f"{time.monotonic() - self._t0:.0f} s")
        for stage, counts in self.stages.items():
            elapsed = max(time.monotonic() - self._started[stage], 1e-6)
            seen, kept = counts["seen"], counts["kept"]
            of = f"/{self.total}" if self.total and len(self.stages) <= 1 else ""
            unit = "images/s" if stage in (self.title, "scrape") else "samples/s"
            t.add_row(
                f"[bold]{stage}[/]",
                f"records {seen}{of}",
                f"kept {kept}",
                f"{kept / elapsed:.1f} {unit}",
                f"{elapsed:.0f} s",
            )
            self._failures(t, counts)
        return t

    @staticmethod
    def _failures(t: Table, counts: Counter) -> None:
        failures = [(k, v) for k, v in counts.most_common() if k not in SUCCESS_KEYS]
        if failures:
            t.add_row("", "failures: " + ", ".join(f"{k} {v}" for k, v in failures[:8]), "", "", "")

    def _drain(self) -> None:
        while True:
            try:
                delta = self.queue.get_nowait()
            except (queue.Empty, OSError, ValueError):
                return
            delta = dict(delta)
            stage = str(delta.pop("stage", self.title))
            if stage not in self.stages:
                self.stages[stage], self._started[stage] = Counter(), time.monotonic()
            self.stages[stage].update(delta)

    def _run(self) -> None:
        with Live(self._render(), console=self.console, refresh_per_second=4, transient=False) as live:
            while not self._stop.wait(0.25):
                self._drain()
                live.update(self._render())
            self._drain()
            live.update(self._render())

    def __enter__(self) -> ProgressDisplay:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if not self.console.is_terminal:  # the last render ends without a newline: the next output would join it
            self.console.file.write("\n")
