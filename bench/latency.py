"""Latency: the reduced and the unreduced model timed in alternation, on the same batch.

Machines are shared and noisy, so a speedup is only meaningful as a ratio measured in one run:
each timed iteration runs both models back to back and the speedup is the median of the
per-iteration ratios, with their interquartile range next to it. CUDA uses events after
warm-up (optionally bf16 autocast); the CPU uses wall clock with a fixed thread count. Peak
memory is what one forward allocates on top of the resident weights and inputs (see
:func:`peak_memory_mb`).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bench.finite import check_finite_output


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
    device = x.device
    with torch.no_grad(), _autocast(device, amp):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            model(x)
            torch.cuda.synchronize(device)
            return (torch.cuda.max_memory_allocated(device) - before) / 2**20
        activities = [torch.profiler.ProfilerActivity.CPU]
        with _quiet_stderr(), torch.profiler.profile(activities=activities, profile_memory=True) as prof:
            model(x)
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak / 2**20


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


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()


def measure_latency(
    model: nn.Module,
    reference: nn.Module,
    x: Tensor,
    warmup: int = 3,
    iters: int = 10,
    amp: bool = False,
    threads: int | None = None,
    show_progress: bool = True,
) -> dict[str, float]:
    """Median ms per batch for ``model`` and ``reference``, and the median per-pair speedup."""
    device = x.device
    old_threads = torch.get_num_threads()
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)
    try:
        timer = _Timer(device)
        model.eval()
        reference.eval()
        ms, ms_ref = [], []
        with torch.no_grad(), _autocast(device, amp):
            for _ in range(warmup):
                check_finite_output(model(x), "latency warm-up")
                check_finite_output(reference(x), "latency warm-up (unreduced)")
            for i in tqdm(range(iters), desc="latency", disable=not show_progress, leave=False):
                # alternate which model goes first, so neither always runs on a warmer cache
                first, second = (model, reference) if i % 2 == 0 else (reference, model)
                a = timer(lambda m=first: m(x))
                b = timer(lambda m=second: m(x))
                (ms if first is model else ms_ref).append(a)
                (ms_ref if first is model else ms).append(b)
        mem = peak_memory_mb(model, x, amp)
        mem_ref = peak_memory_mb(reference, x, amp)
    finally:
        torch.set_num_threads(old_threads)
    med, med_ref = statistics.median(ms), statistics.median(ms_ref)
    batch = x.shape[0]
    ratios = [r / m for r, m in zip(ms_ref, ms, strict=True)]
    q1, q3 = speedup_quartiles(ratios)
    return {
        "latency_ms": med,
        "latency_ms_baseline": med_ref,
        "img_per_s": 1e3 * batch / med,
        "img_per_s_baseline": 1e3 * batch / med_ref,
        "speedup": statistics.median(ratios),
        "speedup_q1": q1,
        "speedup_q3": q3,
        "speedup_ratios": [round(v, 4) for v in ratios],
        "latency_batch": batch,
        "latency_iters": iters,
        "amp_bf16": bool(amp),
        "peak_mem_mb": mem,
        "peak_mem_mb_baseline": mem_ref,
        "threads": torch.get_num_threads() if device.type != "cpu" or not threads else threads,
    }


def speedup_quartiles(ratios: list[float]) -> tuple[float, float]:
    """First and third quartile of the per-iteration speedups: the spread a median hides
    (with one iteration both are that iteration's ratio)."""
    if len(ratios) < 2:
        return ratios[0], ratios[0]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q1, q3
