"""Where a job's time went: seconds per phase, kept in its record and tabled at the end of a sweep.

A benchmark that people run often has to show what it spends its time on, so that a slow run
can be explained (a cold cache, a busy machine, one expensive method) rather than guessed at.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

PHASES = ("setup", "decode", "accuracy", "flops", "latency", "spectral", "scaling")
"""In the order a job runs them; ``setup`` is loading weights, solving the budget, patching."""


class PhaseClock:
    """Accumulates wall-clock seconds per phase name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def record(self) -> dict[str, float]:
        """For a record's ``metrics.seconds_by_phase`` (milliseconds are plenty)."""
        return {k: round(v, 3) for k, v in self.seconds.items()}


def _label(record: dict[str, Any]) -> str:
    target = (record.get("budget") or {}).get("macs_ratio_target")
    name = "unreduced" if record.get("method") == "none" and target is None else str(record.get("method"))
    return name + (f" @{target:.2f}" if isinstance(target, (int, float)) else "")


def time_table(records: list[dict[str, Any]]) -> str:
    """Seconds per phase of each record that has them, a total per row and per column.

    The unreduced model is measured within the first job that needs it; its own accuracy and
    FLOPs are its row, while its cached quantities (spectral reference, scaling latency) count
    in the phases of the job that measured them."""
    rows = [r for r in records if isinstance((r.get("metrics") or {}).get("seconds_by_phase"), dict)]
    if not rows:
        return ""
    used = [p for p in PHASES if any(p in r["metrics"]["seconds_by_phase"] for r in rows)]
    extra = sorted({p for r in rows for p in r["metrics"]["seconds_by_phase"]} - set(PHASES))
    cols = used + extra
    names = [_label(r) for r in rows]
    width = max(len("total"), *(len(n) for n in names))
    header = "job".ljust(width) + "".join(f"{c:>10}" for c in cols) + f"{'total':>10}"
    lines = ["where the time went (seconds):", header]
    sums = dict.fromkeys(cols, 0.0)
    for name, r in zip(names, rows, strict=True):
        s = r["metrics"]["seconds_by_phase"]
        total = sum(s.values())
        cells = "".join(f"{s[c]:>10.1f}" if c in s else f"{'–':>10}" for c in cols)
        lines.append(name.ljust(width) + cells + f"{total:>10.1f}")
        for c in cols:
            sums[c] += s.get(c, 0.0)
    lines.append("total".ljust(width) + "".join(f"{sums[c]:>10.1f}" for c in cols) + f"{sum(sums.values()):>10.1f}")
    cached = sorted({k for r in rows for k in (r["metrics"].get("from_cache") or [])})
    if cached:
        lines.append("reused from the measurement cache: " + ", ".join(cached))
    return "\n".join(lines)
