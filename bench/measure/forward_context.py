"""How every measured forward runs: in inference mode, under bf16 autocast when asked, on a
fixed number of CPU threads. Shared by the timing loop (:mod:`bench.measure.latency`) and the
compile step (:mod:`bench.measure.compiling`), so both run their forwards alike."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch


@contextmanager
def cpu_threads(device: torch.device, threads: int | None) -> Iterator[None]:
    """Run on ``threads`` CPU threads (None: torch's default), restored afterwards even on error."""
    old = torch.get_num_threads()
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()


def inference():
    """How every timed, warm-up, compile and check forward runs: ``torch.inference_mode``, the
    context PyTorch recommends for inference. It skips the version counters and view tracking
    that ``no_grad`` still keeps, a sizeable part of each small operator's dispatch on a CPU,
    and dispatch is most of what a reduction step costs at batch 1. The reduced and the
    unreduced model run in it alike; the arithmetic is the same."""
    return torch.inference_mode()
