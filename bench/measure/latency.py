"""Latency: the reduced and the unreduced model timed in alternation, on the same batch.

Machines are shared and noisy, so a speedup is only meaningful as a ratio measured in one run:
each timed iteration runs both models back to back and the speedup is the median of the
per-iteration ratios, with their interquartile range next to it. The loop is adaptive: after
the minimum number of iterations it goes on until that range is narrow enough or a time cap is
reached, and it says when the machine was busy (load above its CPUs, or unreduced timings
that spread widely), since a loaded machine can turn a real speedup into an apparent slowdown. CUDA uses events after
warm-up (optionally bf16 autocast); the CPU uses wall clock with a fixed thread count. Peak
memory is what one forward allocates on top of the resident weights and inputs (see
:func:`peak_memory_mb`).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from tqdm.auto import tqdm

from bench.finite import check_finite_output
from bench.models import model_without_reducer
from bench.terminal import say

if TYPE_CHECKING:
    from bench.measure.subject import Measured, Subject


class _Timer:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn) -> float:
        """Milliseconds one call of ``fn`` takes; its output is checked for NaN/Inf after the clock stops."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize(self.device)
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            out = fn()
            ms = (time.perf_counter() - t0) * 1e3
        check_finite_output(out, "latency")
        return ms


def peak_memory_mb(model: nn.Module, x: Tensor, amp: bool) -> float:
    """Peak tensor memory one forward allocates on top of what was already resident (weights,
    inputs), in MiB: the part that token reduction can change.

    CUDA: ``max_memory_allocated`` minus the allocation before the forward. CPU: the process
    RSS cannot tell (the allocator keeps freed pages), so the allocations and frees the torch
    profiler records are replayed in time order and their running sum's maximum is taken.
    """
    return _profiled_forward(model, x, amp, "memory")[0]


def _profiled_forward(model: nn.Module, x: Tensor, amp: bool, what: str) -> tuple[float, Tensor]:
    """One forward whose peak memory is read (see :func:`peak_memory_mb`); its output is
    checked, so the forward can double as the last warm-up call instead of costing one more."""
    device = x.device
    with torch.no_grad(), _autocast(device, amp):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            out = model(x)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - before
        else:
            activities = [torch.profiler.ProfilerActivity.CPU]
            with _quiet_stderr(), torch.profiler.profile(activities=activities, profile_memory=True) as prof:
                out = model(x)
            peak = _replayed_peak(prof)
    check_finite_output(out, what)
    return peak / 2**20, out


def _replayed_peak(prof: torch.profiler.profile) -> int:
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def _warm_up(
    models: list[tuple[nn.Module, str]], x: Tensor, warmup: int, amp: bool, memory: bool
) -> list[float | None]:
    """``warmup`` untimed forwards of each ``(model, its name in errors)``, in alternation; with
    ``memory``, the last one of each is also where its peak memory is read, so measuring memory
    costs no forward of its own. Returns the peaks: None where not read (``memory`` off, or no
    warm-up at all, in which case the caller reads them after the timed loop, so that the timing
    still starts cold)."""
    peaks: list[float | None] = [None] * len(models)
    for i in range(warmup):
        for j, (m, what) in enumerate(models):
            if memory and i == warmup - 1:
                peaks[j] = _profiled_forward(m, x, amp, what)[0]
            else:
                check_finite_output(m(x), what)
    return peaks


@contextmanager
def _quiet_stderr():
    """The profiler's C++ backend logs start/stop lines (and, without a GPU, a device-count
    'ERROR') straight to file descriptor 2; keep them out of the user's terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextmanager
def _cpu_threads(device: torch.device, threads: int | None):
    """Run on ``threads`` CPU threads (None: torch's default), restored afterwards even on error."""
    old = torch.get_num_threads()
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()


@dataclass(frozen=True)
class StopRule:
    """When an adaptive timing loop has measured enough (pyperf / timeit autorange in spirit).

    Args:
        min_iters: timed iterations always run (the old fixed count).
        tolerance: stop once the interquartile range of the per-iteration speedups, relative
            to their median, is at most this; None: stop at ``min_iters``.
        max_seconds: stop once the timed loop has run this long (a busy machine never settles).
        max_iters: stop after this many iterations whatever the spread.
    """

    min_iters: int = 10
    tolerance: float | None = None
    max_seconds: float | None = None
    max_iters: int = 200

    def reason(self, ratios: list[float], elapsed: float) -> str | None:
        """Why to stop after ``ratios`` (one per iteration, ``elapsed`` seconds); None: go on."""
        n = len(ratios)
        if n < self.min_iters:
            return None
        if self.tolerance is None:
            return f"{n} iterations"
        spread = relative_spread(ratios)
        if spread <= self.tolerance:
            return f"spread {spread:.1%} <= {self.tolerance:.1%}"
        if self.max_seconds is not None and elapsed >= self.max_seconds:
            return f"time cap {self.max_seconds:g} s (spread {spread:.1%})"
        if n >= self.max_iters:
            return f"iteration cap {self.max_iters} (spread {spread:.1%})"
        return None


def relative_spread(values: list[float]) -> float:
    """Interquartile range over median (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    q1, q3 = speedup_quartiles(values)
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
    q1, q3 = speedup_quartiles(ms)
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


def measure_latency(
    model: nn.Module,
    reference: nn.Module,
    x: Tensor,
    warmup: int = 3,
    iters: int = 10,
    amp: bool = False,
    threads: int | None = None,
    show_progress: bool = True,
    tolerance: float | None = None,
    max_seconds: float | None = None,
    max_iters: int = 200,
    timer: Callable[[Callable[[], Any]], float] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Median ms per batch for ``model`` and ``reference``, and the median per-pair speedup.

    The two run in alternation; with ``tolerance`` the loop goes on past ``iters`` until the
    speedups' relative IQR is within it, ``max_seconds`` have passed or ``max_iters`` ran
    (:class:`StopRule`). ``timer`` (ms of one call) and ``clock`` (seconds) are for tests."""
    device = x.device
    rule = StopRule(iters, tolerance, max_seconds, max(iters, max_iters))
    with _cpu_threads(device, threads):
        timer = timer or _Timer(device)
        model.eval()
        reference.eval()
        ms, ms_ref, ratios = [], [], []
        with torch.no_grad(), _autocast(device, amp):
            mem, mem_ref = _warm_up(
                [(model, "latency warm-up"), (reference, "latency warm-up (unreduced)")], x, warmup, amp, memory=True
            )
            bar = tqdm(desc="latency", total=iters, disable=not show_progress, leave=False)
            start = clock()
            stop = None
            i = 0
            while stop is None:
                # alternate which model goes first, so neither always runs on a warmer cache
                first, second = (model, reference) if i % 2 == 0 else (reference, model)
                a = timer(lambda m=first: m(x))
                b = timer(lambda m=second: m(x))
                (ms if first is model else ms_ref).append(a)
                (ms_ref if first is model else ms).append(b)
                ratios.append(ms_ref[-1] / ms[-1])
                i += 1
                bar.total = max(bar.total, i)
                bar.update(1)
                stop = rule.reason(ratios, clock() - start)
            seconds = clock() - start
            bar.close()
        if mem is None or mem_ref is None:
            mem, mem_ref = peak_memory_mb(model, x, amp), peak_memory_mb(reference, x, amp)
        used_threads = torch.get_num_threads()
    med, med_ref = statistics.median(ms), statistics.median(ms_ref)
    batch = x.shape[0]
    q1, q3 = speedup_quartiles(ratios)
    load = load_average()
    busy = busy_reason(device, ms_ref, load)
    return {
        "latency_ms": med,
        "latency_ms_baseline": med_ref,
        "img_per_s": 1e3 * batch / med,
        "img_per_s_baseline": 1e3 * batch / med_ref,
        "speedup": statistics.median(ratios),
        "speedup_q1": q1,
        "speedup_q3": q3,
        "speedup_ratios": [round(v, 4) for v in ratios],
        "speedup_spread": relative_spread(ratios),
        "latency_batch": batch,
        "latency_iters": len(ratios),
        "latency_stop": stop,
        "latency_seconds": seconds,
        "latency_busy": busy is not None,
        "latency_busy_reason": busy,
        "load_avg": load,
        "amp_bf16": bool(amp),
        "peak_mem_mb": mem,
        "peak_mem_mb_baseline": mem_ref,
        "threads": used_threads,
    }


UNREDUCED_FROM_PAIR = {
    "latency_ms_baseline": "latency_ms",
    "img_per_s_baseline": "img_per_s",
    "peak_mem_mb_baseline": "peak_mem_mb",
    "latency_batch": "latency_batch",
    "latency_iters": "latency_iters",
    "latency_seconds": "latency_seconds",
    "latency_busy": "latency_busy",
    "latency_busy_reason": "latency_busy_reason",
    "load_avg": "load_avg",
    "amp_bf16": "amp_bf16",
    "threads": "threads",
}
"""The unreduced model's own latency numbers, as measured in alternation with a reduced one."""


def unreduced_latency(pair: dict[str, Any], method: str) -> dict[str, Any]:
    """The unreduced model's latency metrics from a reduced job's alternating measurement
    (``pair``), so the unreduced model is not timed against itself a second time."""
    if "latency_ms_baseline" not in pair:
        return {}
    out = {new: pair[old] for old, new in UNREDUCED_FROM_PAIR.items() if old in pair}
    out["latency_measured_with"] = method
    return out


def time_forward(
    model: nn.Module,
    x: Tensor,
    warmup: int = 1,
    iters: int = 5,
    amp: bool = False,
    threads: int | None = None,
    memory: bool = True,
) -> dict[str, Any]:
    """One model alone: median ms per call, the timings, peak memory (optional), the load
    average after the loop and the timings' spread (:func:`timing_spread`, which
    :func:`describe_busy` reads), for measurements whose reference was timed at another moment
    (scaling)."""
    device = x.device
    with _cpu_threads(device, threads):
        timer = _Timer(device)
        model.eval()
        with torch.no_grad(), _autocast(device, amp):
            (mem,) = _warm_up([(model, "latency warm-up")], x, warmup, amp, memory)
            ms = [timer(lambda: model(x)) for _ in range(iters)]
        if memory and mem is None:
            mem = peak_memory_mb(model, x, amp)
    load = load_average() if device.type == "cpu" else None
    spread = timing_spread(ms)
    return {"ms": statistics.median(ms), "timings": ms, "peak_mem_mb": mem, "load": load, "spread": spread}


def speedup_quartiles(ratios: list[float]) -> tuple[float, float]:
    """First and third quartile of the per-iteration speedups: the spread a median hides
    (with one iteration both are that iteration's ratio)."""
    if len(ratios) < 2:
        return ratios[0], ratios[0]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q1, q3


def latency_job(section: DictConfig, subject: Subject, out: Measured) -> None:
    """A reduced model's latency against the unreduced one, timed in alternation on one batch
    (``bench.latency``), and how much of its MACs reduction became speedup."""
    s, lat = subject, section
    x = s.data.images[: lat.batch_size]
    if len(x) < lat.batch_size:
        x = x.repeat((lat.batch_size + len(x) - 1) // len(x), 1, 1, 1)[: lat.batch_size]
    m = out.metrics
    m.update(
        measure_latency(
            s.model,
            model_without_reducer(s.model),
            x.to(s.device),
            lat.warmup,
            lat.iters,
            lat.amp,
            lat.threads,
            s.progress,
            tolerance=lat.get("tolerance"),
            max_seconds=lat.get("max_seconds"),
            max_iters=lat.get("max_iters") or 200,
        )
    )
    if m["latency_busy"]:
        say(f"warning: {s.name}: latency measured on a busy machine ({m['latency_busy_reason']})")
    if "macs_ratio" in m:  # 1.0 = latency fell exactly as much as MACs did
        m["speedup_efficiency"] = m["speedup"] * m["macs_ratio"]
