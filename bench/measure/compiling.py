"""``bench.latency.compile``: both timed models compiled the same way, once, before anything is
timed. The compile time is recorded apart (``compile_seconds``, ``compile_seconds_unreduced``),
and each compiled model's top-1 is checked against its eager top-1 on the largest batch's
images, so a compiler that changes the result cannot pass its timings off as the eager
model's."""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bench.errors import BenchError, job_output_dir
from bench.finite import check_finite_output
from bench.measure.forward_context import autocast, cpu_threads, inference

COMPILE_MODES: dict[str, dict[str, Any] | None] = {
    "eager": None,
    "compile": {"backend": "inductor"},
    "max-autotune": {"backend": "inductor", "mode": "max-autotune"},
    "cudagraphs": {"backend": "inductor", "mode": "reduce-overhead"},
    "cpp-wrapper": {"backend": "inductor", "options": {"cpp_wrapper": True}},
}
"""``bench.latency.compile``: the ``torch.compile`` arguments both timed models get (None: eager).

``cpp-wrapper`` is inductor with its C++ wrapper (``torch._inductor.config.cpp_wrapper``): the
compiled graph calls its kernels from generated C++ instead of generated Python, the setting
PyTorch's own CPU inference benchmarks run with. A reduced forward calls several times more
kernels than the unreduced one (sorts, gathers and scatters in every block), so at batch 1 on a
CPU the Python wrapper's few microseconds per call weigh on the reducers, not on the baseline;
this mode shows what a deployment that removes them gets. Compiling takes longer (the wrapper
is compiled C++ too)."""

COMPILE_TEXT = {
    "eager": "eager",
    "compile": "torch.compile (inductor)",
    "max-autotune": "torch.compile (inductor, max-autotune)",
    "cudagraphs": "torch.compile (inductor, reduce-overhead: CUDA graphs)",
    "cpp-wrapper": "torch.compile (inductor, C++ wrapper)",
}
"""How each mode is named in records' settings lines, leaderboard headings and plots."""
GPU_ONLY_MODES = ("cudagraphs",)
CALLS_TO_COMPILE = {"cudagraphs": 3}
"""Calls until a mode runs what it will run from then on: CUDA graphs record on the later calls
of a shape (the first runs the compiled kernels without a graph); other modes, one."""

AGREEMENT_MIN = 99.5
"""Compiled top-1 must equal eager top-1 on at least this share (%) of the images checked."""


def compile_mode(value: Any, device_type: str) -> str:
    """``bench.latency.compile`` checked: a known mode (missing in old configs: eager), and CUDA
    graphs only on a CUDA device. Raises :class:`BenchError` with one line otherwise."""
    mode = "eager" if value is None else value
    if not isinstance(mode, str) or mode not in COMPILE_MODES:
        raise BenchError(f"bench.latency.compile must be one of {', '.join(COMPILE_MODES)}, got {value!r}")
    if mode in GPU_ONLY_MODES and device_type != "cuda":
        raise BenchError(
            f"bench.latency.compile={mode} needs a CUDA device (CUDA graphs), but this job runs on "
            f"{device_type}; use bench.latency.compile=compile, max-autotune or cpp-wrapper there"
        )
    return mode


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process (0 before its first use: reading the
    counter must not import dynamo into an eager job)."""
    utils = sys.modules.get("torch._dynamo.utils")
    return int(utils.counters["stats"]["unique_graphs"]) if utils is not None else 0


class _StepMarked(nn.Module):
    """A CUDA-graphs model that starts a new graph step before every call
    (``torch.compiler.cudagraph_mark_step_begin``): the timed loop keeps no output of an earlier
    call, and the two models run in alternation, so each call is a step of its own."""

    def __init__(self, compiled: nn.Module) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, x: Tensor) -> Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(x)


@dataclass
class TimedPair:
    """The reduced and the unreduced model as they are timed (compiled or not), and what
    compiling them found (``compile_seconds``, agreement with eager, notes)."""

    model: nn.Module
    reference: nn.Module
    metrics: dict[str, Any] = field(default_factory=dict)
    compiled: bool = False
    graphs: bool = False
    """CUDA graphs: a replay allocates nothing (the graph's memory pool was reserved when it was
    recorded), so a forward's peak memory cannot be read and is recorded as None, not as 0."""


def _top1(model: nn.Module, x: Tensor, amp: bool, what: str) -> Tensor:
    with inference(), autocast(x.device, amp):
        out = model(x)
    check_finite_output(out, what)
    return out.argmax(-1).cpu()


def compiled_model(model: nn.Module, mode: str) -> nn.Module:
    """``model`` as ``mode`` runs it (:data:`COMPILE_MODES`; eager: ``model`` itself): one static
    graph (``fullgraph``: a graph break would leave part of the forward eager, and a block
    compiled per token count until dynamo's recompile limit, then eager, timed as if compiled);
    under CUDA graphs every call a graph step of its own (:class:`_StepMarked`). Compiling
    happens on the first calls."""
    options = COMPILE_MODES[mode]
    if options is None:
        return model
    compiled = torch.compile(model, dynamic=False, fullgraph=True, **options)
    return _StepMarked(compiled) if mode in GPU_ONLY_MODES else compiled


def _compile_one(
    model: nn.Module, x: Tensor, sizes: list[int], mode: str, amp: bool, what: str
) -> tuple[nn.Module, float, Tensor]:
    """``model`` compiled, the seconds until every batch size ran compiled (CUDA graphs: three
    times, since they record on the later calls), and its top-1 on the largest batch."""
    calls = CALLS_TO_COMPILE.get(mode, 1)
    t0 = time.perf_counter()
    try:
        runner = compiled_model(model, mode)
        top1 = torch.empty(0, dtype=torch.long)
        with inference(), autocast(x.device, amp):
            for n in sizes:
                for _ in range(calls):
                    out = runner(x[:n])
                    check_finite_output(out, what)
                top1 = out.argmax(-1).cpu()
    except BenchError:
        raise
    except Exception as e:  # noqa: BLE001 - a backend failure is one line, not a traceback
        first = (str(e).strip().splitlines() or [""])[0][:200]
        saved = _save_compile_traceback()
        raise BenchError(
            f"bench.latency.compile={mode}: compiling {what} failed ({type(e).__name__}: {first}"
            f"{f'; traceback in {saved}' if saved else ''}); use bench.latency.compile=eager"
        ) from None
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return runner, time.perf_counter() - t0, top1


def _save_compile_traceback() -> Path | None:
    """The compiler's whole traceback in the job's folder (``compile-traceback.txt``), called
    while its exception is handled: the one line says what failed, this says where (inductor's
    errors point deep into its lowering). None outside a Hydra job."""
    out = job_output_dir()
    if out is None:
        return None
    path = out / "compile-traceback.txt"
    try:
        path.write_text(traceback.format_exc())
    except OSError:
        return None
    return path


def _agreement(compiled: Tensor, eager: Tensor, n: int) -> float:
    return 100.0 * float((compiled[:n] == eager[:n]).float().mean())


def _agreement_note(name: str, agreement: float, n: int, mode: str, random_weights: bool = False) -> str | None:
    """Why the compiled timings may not be of the same model, or None when its top-1 agrees."""
    if agreement >= AGREEMENT_MIN:
        return None
    share = f"{agreement:.1f}% of {n} images, below {AGREEMENT_MIN:g}%"
    said = f"{name}: compiled ({mode}) top-1 agrees with eager on {share}"
    if random_weights:
        return (
            f"{said}: random weights, whose logits are nearly tied, so that rounding (a fused "
            "kernel, bf16) flips top-1; a weak check here, a real one needs trained weights"
        )
    return (
        f"{said}: the compiled model computes something else (numerics, or a "
        "graph that captured a different path); its latency is not the eager model's"
    )


def compile_pair(
    model: nn.Module,
    reference: nn.Module,
    x: Tensor,
    sizes: list[int],
    mode: str,
    amp: bool = False,
    distinct: int | None = None,
    random_weights: bool = False,
) -> TimedPair:
    """Both models compiled the same way (``mode``, see :data:`COMPILE_MODES`), each run once at
    every batch size so the timed loop starts compiled; eager returns them as they are.

    Compile time is measured here, once per model, and never in a timed loop. Each compiled
    model's top-1 on ``x`` (the largest batch; its first ``distinct`` images are distinct) is
    checked against its eager top-1, so a compiler that changes the result cannot pass its
    timings off as the eager model's."""
    if COMPILE_MODES[mode] is None:
        return TimedPair(model, reference)
    import torch._dynamo

    n = min(distinct or len(x), len(x))
    model.eval()
    reference.eval()
    eager = {"": _top1(model, x, amp, "latency (eager check)")}
    eager["_unreduced"] = _top1(reference, x, amp, "latency (eager check, unreduced)")
    torch._dynamo.reset()  # no graphs of an earlier job: its guards and recompile count are not this one's
    metrics: dict[str, Any] = {"latency_compile_images": n}
    runners = {}
    for suffix, m, what in (("", model, "the reduced model"), ("_unreduced", reference, "the unreduced model")):
        runner, seconds, top1 = _compile_one(m, x, sizes, mode, amp, what)
        runners[suffix] = runner
        agreement = _agreement(top1, eager[suffix], n)
        metrics[f"compile_seconds{suffix}"] = seconds
        metrics[f"latency_compile_agreement{suffix}"] = agreement
        note = _agreement_note(what, agreement, n, mode, random_weights)
        if note:
            metrics[f"latency_compile_note{suffix}"] = note
    return TimedPair(runners[""], runners["_unreduced"], metrics, compiled=True, graphs=mode in GPU_ONLY_MODES)


@contextmanager
def timed_pair(
    model: nn.Module,
    reference: nn.Module,
    x: Tensor,
    sizes: list[int],
    mode: str,
    amp: bool = False,
    threads: int | None = None,
    distinct: int | None = None,
    random_weights: bool = False,
) -> Iterator[TimedPair]:
    """:func:`compile_pair` on the timing threads; the compiled graphs are dropped afterwards
    (their memory, and guards that would make the next job's compile a recompile)."""
    try:
        with cpu_threads(x.device, threads):
            pair = compile_pair(model, reference, x, sizes, mode, amp, distinct, random_weights)
        yield pair
    finally:
        if COMPILE_MODES.get(mode) is not None and "torch._dynamo" in sys.modules:
            torch._dynamo.reset()
