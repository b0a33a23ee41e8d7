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
    """Reads count deltas (``{"seen": n, "kept": n, reason: n}``) from a queue and renders them until closed."""

    def __init__(self, title: str, total: int | None = None, console: Console | None = None):
        self.title = title
        self.total = total
        self.counts: Counter = Counter()
        self.queue = mp.get_context("spawn").Queue()
        self.console = console or Console(stderr=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.monotonic()

    def _render(self) -> Table:
        elapsed = max(time.monotonic() - self._t0, 1e-6)
        t = Table.grid(padding=(0, 2))
        seen, kept = self.counts["seen"], self.counts["kept"]
        of = f"/{self.total}" if self.total else ""
        t.add_row(
            f"[bold]{self.title}[/]",
            f"records {seen}{of}",
            f"kept {kept}",
            f"{kept / elapsed:.1f} images/s",
            f"{elapsed:.0f} s",
        )
        failures = [(k, v) for k, v in self.counts.most_common() if k not in SUCCESS_KEYS]
        if failures:
            t.add_row("", "failures: " + ", ".join(f"{k} {v}" for k, v in failures[:8]), "", "", "")
        return t

    def _drain(self) -> None:
        while True:
            try:
                delta = self.queue.get_nowait()
            except (queue.Empty, OSError, ValueError):
                return
            self.counts.update(delta)

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
