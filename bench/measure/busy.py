"""Whether a timing can be trusted: the machine's state while it was measured.

Latency on a shared machine is only a ratio measured in one run, and even then other work can
bend it. Three signs mark a measurement busy, each with its reason for the record and the
leaderboard: a 1-minute load average above the CPUs this process may use, a wide spread of the
unreduced model's timings (beyond a scheduler tick), and an unreduced forward well above the
median of those the run store holds at the same settings (a contended host that shows neither
of the first two). :mod:`bench.measure.latency` and :mod:`bench.measure.scaling` time; this
module judges.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterable
from typing import Any

import torch


def quartiles(values: list[float]) -> tuple[float, float]:
    """First and third quartile of per-iteration speedups or timings: the spread a median hides
    (with one value both are that value)."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def relative_spread(values: list[float]) -> float:
    """Interquartile range over median (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    q1, q3 = quartiles(values)
    med = statistics.median(values)
    return (q3 - q1) / med if med else float("inf")


BUSY_SPREAD = 0.10
"""Unreduced timings whose IQR exceeds this share of their median mean something else runs."""

JITTER_MS = 2.0
"""IQRs up to this many milliseconds are scheduler jitter (one tick of a loaded kernel), never a
busy machine: otherwise 20-30 ms forwards (batch 1 at 224 px) are flagged busy for one tick."""


def timing_spread(ms: list[float]) -> float:
    """Relative IQR of timings (see :func:`relative_spread`), 0 where their IQR is within
    :data:`JITTER_MS`: the spread the busy flag reads."""
    if len(ms) < 2:
        return 0.0
    q1, q3 = quartiles(ms)
    return 0.0 if q3 - q1 <= JITTER_MS else relative_spread(ms)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def busy_reason(
    device: torch.device, reference_ms: list[float], load: float | None = None, what: str = "unreduced timings"
) -> str | None:
    """Why these timings may not be trusted, or None: on the CPU, a 1-minute load average (which
    counts this job's own threads) above the CPUs this process may use, i.e. other work
    competed for them; on any device, a wide spread of the unreduced model's timings."""
    load = load_average() if load is None and device.type == "cpu" else load
    return describe_busy(device, load, timing_spread(reference_ms), what)


def describe_busy(device: torch.device, load: float | None, spread: float, what: str = "timings") -> str | None:
    """The busy reason for a load average and a relative timing spread (see :func:`busy_reason`)."""
    reasons = []
    if device.type == "cpu" and load is not None and load > cpu_count() + 0.5:
        reasons.append(f"load {load:.1f} on {cpu_count()} CPUs")
    if spread > BUSY_SPREAD:
        reasons.append(f"{what} spread {spread:.0%}")
    return "; ".join(reasons) or None


SLOWER_THAN_USUAL = 0.25
"""An unreduced forward this much slower than the median of those recorded at the same settings
means the machine is not in its usual state: on the project's shared 2-core VM, on days when its
host is contended, every forward is 30-45% slower with neither a high load average nor a wide
spread of timings, and the reducers' many small operators suffer more than the unreduced model's
large ones, so speedups fall too (batch 1 most). The median, not the fastest: on quiet days
batch-1 timings of one sweep still range over 15-35% (against the fastest, a fifth of such
rows were flagged; against the median, 0-6%, and nearly every row of the contended sweeps)."""


def timing_settings(record: dict[str, Any]) -> tuple:
    """What an unreduced forward's latency depends on besides the machine's state: the model,
    the device, the compile mode, the precision, the thread count and the image size."""
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    bench = config.get("bench") if isinstance(config.get("bench"), dict) else {}
    lat = bench.get("latency") if isinstance(bench.get("latency"), dict) else {}
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    mode = lat.get("compile") or "eager"
    precision = bool(lat.get("amp"))
    return (record.get("model"), record.get("device"), mode, precision, lat.get("threads"), model.get("img_size"))


def slower_than_usual(metrics: dict[str, Any], settings: tuple, records: Iterable[dict[str, Any]]) -> dict[int, str]:
    """Per batch size, why this job's unreduced timing says the machine is slower than usual:
    more than :data:`SLOWER_THAN_USUAL` over the median unreduced timing of the ``records``
    (earlier ones of the run store) at the same :func:`timing_settings`, busy ones left out;
    at least three of them, or there is no usual to speak of."""
    sizes = metrics.get("latency_batches") or []
    earlier: dict[int, list[float]] = {n: [] for n in sizes}
    for r in records:
        m = r.get("metrics")
        if not isinstance(m, dict) or timing_settings(r) != settings:
            continue
        for n in sizes:
            ms = m.get(f"latency_ms_baseline_b{n}")
            if isinstance(ms, (int, float)) and ms > 0 and not m.get(f"latency_busy_b{n}"):
                earlier[n].append(float(ms))
    reasons = {}
    for n in sizes:
        now = metrics.get(f"latency_ms_baseline_b{n}")
        if len(earlier[n]) < 3 or not isinstance(now, (int, float)):
            continue
        usual = statistics.median(earlier[n])
        if now > (1 + SLOWER_THAN_USUAL) * usual:
            reasons[n] = (
                f"unreduced {now:.1f} ms, {now / usual - 1:.0%} slower than the median of the "
                f"{len(earlier[n])} recorded here at these settings ({usual:.1f} ms)"
            )
    return reasons


def mark_busy_batches(metrics: dict[str, Any], reasons: dict[int, str]) -> None:
    """Add ``reasons`` (by batch size) to the busy flags of ``metrics``, as :func:`merge_batches`
    words them."""
    if not reasons:
        return
    sizes = metrics["latency_batches"]
    for n, why in reasons.items():
        old = metrics.get(f"latency_busy_reason_b{n}")
        metrics[f"latency_busy_b{n}"] = True
        metrics[f"latency_busy_reason_b{n}"] = f"{old}; {why}" if old else why
    busy = [(n, metrics[f"latency_busy_reason_b{n}"]) for n in sizes if metrics.get(f"latency_busy_b{n}")]
    metrics["latency_busy"] = True
    metrics["latency_busy_reason"] = busy_summary(sizes, busy)


def busy_summary(sizes: list[int], busy: list[tuple[int, str]]) -> str:
    """One record's busy reason from ``(batch size, reason)`` pairs: each reason prefixed with
    its batch where the record timed more than one (``sizes``)."""
    return "; ".join(why if len(sizes) == 1 else f"batch {n}: {why}" for n, why in busy)
