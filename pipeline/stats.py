"""StageStats: what a stage saw, kept and dropped (with a reason for every drop), and how long it took."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class StageStats:
    """Counts of one stage over one or more shards; stats add up with ``+`` and ``sum``."""

    seen: int = 0  # input records the stage looked at
    kept: int = 0  # samples written to the output
    dropped: Counter = field(default_factory=Counter)  # snake_case reason -> count
    timings: Counter = field(default_factory=Counter)  # phase name -> seconds (wall)

    def drop(self, reason: str, n: int = 1) -> None:
        """Count ``n`` samples dropped for ``reason``."""
        self.dropped[reason] += n

    @contextmanager
    def timer(self, phase: str):
        """Add the wall time of the ``with`` block to ``timings[phase]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] += time.perf_counter() - t0

    @property
    def n_dropped(self) -> int:
        """Total dropped samples over all reasons."""
        return sum(self.dropped.values())

    def check(self) -> None:
        """Raise if the funnel does not add up (seen = kept + dropped): nothing may vanish silently."""
        if self.seen != self.kept + self.n_dropped:
            raise ValueError(f"stats do not add up: seen={self.seen} kept={self.kept} dropped={dict(self.dropped)}")

    def __add__(self, other: StageStats) -> StageStats:
        if not isinstance(other, StageStats):
            return NotImplemented
        return StageStats(
            seen=self.seen + other.seen,
            kept=self.kept + other.kept,
            dropped=self.dropped + other.dropped,
            timings=self.timings + other.timings,
        )

    def __radd__(self, other):  # lets sum(stats_list) start from 0
        if other == 0:
            return self
        return self.__add__(other)

    def to_dict(self) -> dict:
        """A JSON-ready dict, drop reasons sorted by count (the funnel order)."""
        return {
            "seen": self.seen,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items(), key=lambda kv: (-kv[1], kv[0]))),
            "timings": {k: round(v, 4) for k, v in sorted(self.timings.items())},
        }

    @classmethod
    def from_dict(cls, d: dict) -> StageStats:
        """Inverse of :meth:`to_dict`."""
        return cls(
            seen=int(d.get("seen", 0)),
            kept=int(d.get("kept", 0)),
            dropped=Counter({k: int(v) for k, v in d.get("dropped", {}).items()}),
            timings=Counter({k: float(v) for k, v in d.get("timings", {}).items()}),
        )

    def to_json(self) -> str:
        """Serialise to a JSON string."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


def error_line(e: BaseException) -> str:
    """One line for an error that stops a stage or a trainer: the original message when a DataLoader worker raised
    it (the loader re-raises it as "Caught ValueError in DataLoader worker process 0." with the worker's traceback)."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
    if lines[0].startswith("Caught ") and len(lines) > 1:  # the message follows the last "SomeError: " line
        heads = [i for i, ln in enumerate(lines) if re.match(r"^[\w.]*(Error|Exception): ", ln)]
        if heads:
            return lines[heads[-1]].split(": ", 1)[1].strip()
    return lines[0].strip()
