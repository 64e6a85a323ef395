"""Latency: the reduced and the unreduced model timed in alternation, on the same batch.

Machines are shared and noisy, so a speedup is only meaningful as a ratio measured in one run:
each timed iteration runs both models back to back and the speedup is the median of the
per-iteration ratios, with their interquartile range next to it. The loop is adaptive: after
the minimum number of iterations it goes on until that range is narrow enough or a time cap is
reached, and it says when the machine was busy (:mod:`bench.measure.busy`), since a loaded
machine can turn a real speedup into an apparent slowdown. CUDA uses events after warm-up
(optionally bf16 autocast); the CPU uses wall clock with a fixed thread count. Peak
memory is what one forward allocates on top of the resident weights and inputs (see
:func:`peak_memory_mb`).

Each batch size of ``bench.latency.batch_size`` (a list: batch 1 is what an interactive user
waits for, a large batch what a server's throughput is) is timed on its own, with its own stop
rule, and recorded under its own keys (``latency_ms_b1``, ``speedup_b32``, ...). With
``bench.latency.compile`` both models are compiled the same way before anything is timed; the
compile time is recorded apart (``compile_seconds``, ``compile_seconds_unreduced``), and the
compiled models' top-1 is checked against eager on the largest batch's images.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bench.config import LatencyConfig
from bench.errors import BenchError
from bench.finite import check_finite_output
from bench.measure.busy import (
    busy_reason,
    busy_summary,
    load_average,
    quartiles,
    relative_spread,
    timing_spread,
)
from bench.measure.compiling import TimedPair, compile_mode, compiled_graphs, timed_pair
from bench.measure.forward_context import autocast, cpu_threads, inference
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
    with inference(), autocast(device, amp):
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
    desc: str = "latency",
    compiles: Callable[[], int] | None = None,
    memory: bool = True,
) -> dict[str, Any]:
    """Median ms per batch for ``model`` and ``reference``, and the median per-pair speedup.

    The two run in alternation; with ``tolerance`` the loop goes on past ``iters`` until the
    speedups' relative IQR is within it, ``max_seconds`` have passed or ``max_iters`` ran
    (:class:`StopRule`). ``timer`` (ms of one call) and ``clock`` (seconds) are for tests;
    ``desc`` names the progress bar. ``compiles`` (compiled models: graphs compiled so far)
    is read around the timed loop, so a recompile inside it is recorded
    (``latency_recompiles``) instead of hiding in the timings. ``memory=False`` (CUDA graphs)
    records no peak memory (None)."""
    device = x.device
    rule = StopRule(iters, tolerance, max_seconds, max(iters, max_iters))
    with cpu_threads(device, threads):
        timer = timer or _Timer(device)
        model.eval()
        reference.eval()
        ms, ms_ref, ratios = [], [], []
        with inference(), autocast(device, amp):
            mem, mem_ref = _warm_up(
                [(model, "latency warm-up"), (reference, "latency warm-up (unreduced)")], x, warmup, amp, memory
            )
            bar = tqdm(desc=desc, total=iters, disable=not show_progress, leave=False)
            graphs = compiles() if compiles else 0
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
            recompiles = compiles() - graphs if compiles else None
            bar.close()
        if memory and (mem is None or mem_ref is None):
            mem, mem_ref = peak_memory_mb(model, x, amp), peak_memory_mb(reference, x, amp)
        used_threads = torch.get_num_threads()
    med, med_ref = statistics.median(ms), statistics.median(ms_ref)
    batch = x.shape[0]
    q1, q3 = quartiles(ratios)
    load = load_average()
    busy = busy_reason(device, ms_ref, load)
    out = {
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
    if recompiles is not None:
        out["latency_recompiles"] = recompiles
    return out


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
    "latency_batches": "latency_batches",
    "latency_compile": "latency_compile",
    "compile_seconds_unreduced": "compile_seconds",
    "latency_compile_agreement_unreduced": "latency_compile_agreement",
    "latency_compile_images": "latency_compile_images",
    "latency_compile_note_unreduced": "latency_compile_note",
}
"""The unreduced model's own latency numbers, as measured in alternation with a reduced one."""

UNREDUCED_PER_BATCH = {
    "latency_ms_baseline": "latency_ms",
    "img_per_s_baseline": "img_per_s",
    "peak_mem_mb_baseline": "peak_mem_mb",
    "latency_iters": "latency_iters",
    "latency_seconds": "latency_seconds",
    "latency_busy": "latency_busy",
    "latency_busy_reason": "latency_busy_reason",
}
"""The same, per batch size (``_b<n>`` on both sides)."""


def unreduced_latency(pair: dict[str, Any], method: str) -> dict[str, Any]:
    """The unreduced model's latency metrics from a reduced job's alternating measurement
    (``pair``), so the unreduced model is not timed against itself a second time."""
    if "latency_ms_baseline" not in pair:
        return {}
    names = dict(UNREDUCED_FROM_PAIR)
    for n in pair.get("latency_batches") or []:
        names.update({f"{old}_b{n}": f"{new}_b{n}" for old, new in UNREDUCED_PER_BATCH.items()})
    out = {new: pair[old] for old, new in names.items() if old in pair}
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
    with cpu_threads(device, threads):
        timer = _Timer(device)
        model.eval()
        with inference(), autocast(device, amp):
            (mem,) = _warm_up([(model, "latency warm-up")], x, warmup, amp, memory)
            ms = [timer(lambda: model(x)) for _ in range(iters)]
        if memory and mem is None:
            mem = peak_memory_mb(model, x, amp)
    load = load_average() if device.type == "cpu" else None
    spread = timing_spread(ms)
    return {"ms": statistics.median(ms), "timings": ms, "peak_mem_mb": mem, "load": load, "spread": spread}


# -- settings: batch sizes and compile mode ------------------------------------------------------

DEFAULT_BATCH_SIZES = {"cpu": (1, 32), "cuda": (1, 256)}
"""``bench.latency.batch_size=auto`` (or null), by device type: batch 1 (what one user waits for)
and a throughput batch that fits the device. Other devices take the CPU's."""

_BATCH_HELP = "auto, an integer >= 1 or a non-empty list of them"


def latency_batch_sizes(value: Any, device_type: str) -> list[int]:
    """The batch sizes ``bench.latency.batch_size`` asks for, ascending and distinct.

    One integer (old configs and records) is a list of one; ``auto``/null depends on the
    device, since a GPU's throughput batch would not fit a laptop's CPU. Raises
    :class:`BenchError` with one line for anything else."""
    key = "bench.latency.batch_size"
    if value is None or value == "auto":
        return list(DEFAULT_BATCH_SIZES.get(device_type, DEFAULT_BATCH_SIZES["cpu"]))
    if _is_int(value):
        if value < 1:
            raise BenchError(f"{key} must be an integer >= 1, got {value!r}")
        return [int(value)]
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        sizes = list(value)
        if not sizes or not all(_is_int(v) and v >= 1 for v in sizes):
            raise BenchError(f"{key} must be {_BATCH_HELP}, got {sizes!r}")
        return sorted(set(int(v) for v in sizes))
    raise BenchError(f"{key} must be {_BATCH_HELP}, got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def configured_device_type(name: Any) -> str:
    """The device type ``device=<name>`` will resolve to (``auto``: cuda where available), for
    checks made before the job resolves it; a malformed name reads as cpu (the job names it)."""
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(str(name)).type
    except RuntimeError:
        return "cpu"


def check_latency_settings(latency: LatencyConfig, device: str) -> None:
    """``bench.latency.batch_size`` and ``bench.latency.compile`` checked before any measurement
    (called by :func:`bench.validate.validate_settings`; ``device``: the job's ``device`` setting)."""
    device_type = configured_device_type(device)
    latency_batch_sizes(latency.batch_size, device_type)
    compile_mode(latency.compile, device_type)


def latency_images(images: Tensor, size: int) -> Tensor:
    """The first ``size`` evaluation images, repeated when there are fewer: every method is
    timed on the same inputs, and batch ``n`` is the first ``n`` of them."""
    x = images[:size]
    if len(x) < size:
        x = x.repeat((size + len(x) - 1) // len(x), 1, 1, 1)[:size]
    return x


# -- one measurement per batch size -----------------------------------------------------------------

PER_BATCH_KEYS = (
    "latency_ms",
    "latency_ms_baseline",
    "img_per_s",
    "img_per_s_baseline",
    "speedup",
    "speedup_q1",
    "speedup_q3",
    "speedup_ratios",
    "speedup_spread",
    "latency_iters",
    "latency_stop",
    "latency_seconds",
    "latency_busy",
    "latency_busy_reason",
    "peak_mem_mb",
    "peak_mem_mb_baseline",
    "latency_recompiles",
)
"""What :func:`measure_latency` finds that differs by batch size: recorded as ``<key>_b<n>``."""


def merge_batches(per_batch: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One record's latency metrics from one :func:`measure_latency` result per batch size.

    Every batch's numbers get the suffix ``_b<n>``; the plain keys stay those of the largest
    batch, as in records from before batch-size lists, except ``latency_busy(_reason)`` and
    ``latency_seconds`` (and ``latency_recompiles``), which cover every batch."""
    sizes = sorted(per_batch)
    out = dict(per_batch[sizes[-1]])
    for n in sizes:
        out.update({f"{k}_b{n}": per_batch[n][k] for k in PER_BATCH_KEYS if k in per_batch[n]})
    out["latency_batches"] = sizes
    busy = [(n, per_batch[n]["latency_busy_reason"]) for n in sizes if per_batch[n]["latency_busy"]]
    out["latency_busy"] = bool(busy)
    out["latency_busy_reason"] = busy_summary(sizes, busy) if busy else None
    out["latency_seconds"] = sum(per_batch[n]["latency_seconds"] for n in sizes)
    if all("latency_recompiles" in per_batch[n] for n in sizes):
        out["latency_recompiles"] = sum(per_batch[n]["latency_recompiles"] for n in sizes)
    return out


def measure_batches(
    pair: TimedPair,
    x: Tensor,
    sizes: list[int],
    section: LatencyConfig,
    show_progress: bool = True,
    timer: Callable[[Callable[[], Any]], float] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Every batch size timed in alternation (reduced, unreduced) on the first ``n`` images of
    ``x``, smallest first, each with its own stop rule (``section``: ``bench.latency``; its
    ``max_seconds`` caps each batch size's loop). ``timer`` and ``clock`` are for tests."""
    lat = section
    per_batch = {}
    for n in sizes:
        per_batch[n] = measure_latency(
            pair.model,
            pair.reference,
            x[:n],
            lat.warmup,
            lat.iters,
            lat.amp,
            lat.threads,
            show_progress,
            tolerance=lat.tolerance,
            max_seconds=lat.max_seconds,
            max_iters=lat.max_iters,
            timer=timer,
            clock=clock,
            desc=f"latency b={n}",
            compiles=compiled_graphs if pair.compiled else None,
            memory=not pair.graphs,
        )
    return merge_batches(per_batch)


def latency_job(section: LatencyConfig, subject: Subject, out: Measured) -> None:
    """A reduced model's latency against the unreduced one, timed in alternation at every batch
    size of ``bench.latency`` (compiled the same way when asked), and how much of its MACs
    reduction became speedup."""
    s, lat = subject, section
    sizes = latency_batch_sizes(lat.batch_size, s.device.type)
    mode = compile_mode(lat.compile, s.device.type)
    x = latency_images(s.data.images, sizes[-1]).to(s.device)
    distinct = min(len(s.data.images), sizes[-1])
    m = out.metrics
    reference = model_without_reducer(s.model)
    with timed_pair(s.model, reference, x, sizes, mode, lat.amp, lat.threads, distinct, s.random_weights) as pair:
        m.update(measure_batches(pair, x, sizes, lat, s.progress))
    m["latency_compile"] = mode
    m.update(pair.metrics)
    _compile_warnings(s.name, m)
    if m["latency_busy"]:
        say(f"warning: {s.name}: latency measured on a busy machine ({m['latency_busy_reason']})")
    if "macs_ratio" in m:  # 1.0 = latency fell exactly as much as MACs did
        m["speedup_efficiency"] = m["speedup"] * m["macs_ratio"]
        for n in m["latency_batches"]:
            m[f"speedup_efficiency_b{n}"] = m[f"speedup_b{n}"] * m["macs_ratio"]


def _compile_warnings(name: str, m: dict[str, Any]) -> None:
    """Say what makes compiled timings doubtful: a top-1 that differs from eager, or graphs
    compiled inside a timed loop (recorded as a note too)."""
    if m.get("latency_recompiles"):
        note = (
            f"{m['latency_recompiles']} graph(s) compiled inside the timed loops after the warm-up: "
            "their compile time is in the timings"
        )
        m["latency_compile_note"] = "; ".join(filter(None, [m.get("latency_compile_note"), note]))
    for key in ("latency_compile_note", "latency_compile_note_unreduced"):
        if m.get(key):
            say(f"warning: {name}: {m[key]}")
