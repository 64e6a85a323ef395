"""``python -m bench.kernel_profile``: where a reduced forward's time goes, operator by operator.

The speed table says *that* a reducer is slow at some setting; this says *why*: for each method
at a MACs budget it profiles a few eager forwards with ``torch.profiler`` and writes the share
of the forward spent inside the reducer's steps (``reducer.reduce``, marked with a profiler
range) and the operators that cost the most (self device time on a GPU, self CPU time on the
CPU). ``--compile`` profiles the forward as a compiled mode of ``bench.latency.compile`` runs it
(inductor's generated kernels, each named after the operators it fused), which is where a
reducer slower than unreduced under CUDA graphs spends its kernel time; there the reducer's share
is not given, since a compiled graph's kernels fuse across the reducer's steps. It is a
diagnostic for the people changing the reducers, not a benchmark: profiling slows every operator
down, so its milliseconds are not latencies; ``bench.run`` measures those.

Random weights (a reducer's cost does not depend on them); the device, dtype and batch are
named in every table. ``bench.gpu_session`` runs it on a borrowed GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.autograd import DeviceType

from bench.budget import solve_budget
from bench.errors import BenchError
from bench.job import build_reducer_from_config
from bench.measure.compiling import CALLS_TO_COMPILE, COMPILE_MODES, COMPILE_TEXT, GPU_ONLY_MODES, compiled_model
from bench.models import load_model
from bench.report.labels import METHOD_CONF
from bench.store import git_commit
from methods import ReducerConfigError, TokenReducer, UnsupportedModelError, apply_reducer

REDUCE_RANGE = "reducer.reduce"


def reduced_model(
    method: str, model_name: str, macs_ratio: float, mark: bool = True
) -> tuple[torch.nn.Module, TokenReducer]:
    """``model_name`` (random weights) with ``method``'s reducer at ``macs_ratio``; with ``mark``
    every call to the reducer's ``reduce`` is wrapped in the profiler range :data:`REDUCE_RANGE`
    (not for a compiled model: the range would be traced away)."""
    path = METHOD_CONF / f"{method}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in METHOD_CONF.glob("*.yaml"))
        raise BenchError(f"unknown method {method!r}; choose from {', '.join(known)}")
    model = load_model(model_name, random_init=True)
    reducer = build_reducer_from_config(OmegaConf.load(path))
    reducer, _ = solve_budget(reducer, macs_ratio, 0.02, model, method)
    if not mark:
        return apply_reducer(model, reducer), reducer
    inner = reducer.reduce

    def reduce(state, block):
        with torch.profiler.record_function(REDUCE_RANGE):
            return inner(state, block)

    reducer.reduce = reduce  # type: ignore[method-assign]
    return apply_reducer(model, reducer), reducer


def profile_forward(
    model: torch.nn.Module, x: torch.Tensor, amp: bool, iters: int, mode: str = "eager"
) -> tuple[torch.profiler.profile, float]:
    """``iters`` profiled forwards of ``model`` as ``mode`` runs it, after unprofiled ones that
    compile it (the profile holds no compiling); also the seconds those took."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if x.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp)
    runner = compiled_model(model, mode)
    start = time.perf_counter()
    with torch.inference_mode(), autocast:
        for _ in range(max(2, CALLS_TO_COMPILE.get(mode, 1))):
            runner(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        warm_seconds = time.perf_counter() - start
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(iters):
                with torch.profiler.record_function("forward"):
                    runner(x)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
    return prof, warm_seconds


def _time_of(prof: torch.profiler.profile, name: str, device: bool) -> float:
    """Total microseconds of the profiler range ``name``: on a GPU the summed time of the kernels
    launched inside it (the range's host-side event; its device-side twin spans the gaps between
    kernels too, which an eager forward has and a CUDA graph does not), else its CPU time."""
    total = 0.0
    for event in prof.events():
        if event.name == name and event.device_type == DeviceType.CPU:
            total += event.device_time_total if device else event.cpu_time_total
    return total


def report(
    method: str,
    prof: torch.profiler.profile,
    on_gpu: bool,
    iters: int,
    rows: int,
    mode: str = "eager",
    warm_seconds: float | None = None,
) -> str:
    """One method's section: the forward's time per call, the reducer's share (eager only), the
    top operators (compiled: inductor's kernels); compiled, also how long compiling took."""
    forward = _time_of(prof, "forward", on_gpu) / iters
    sort_by = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    clock = "kernel time, launch gaps left out" if on_gpu else "CPU time"
    head = f"## {method}\n\nper forward ({clock}, under the profiler): {forward / 1000:.3f} ms"
    if mode == "eager":
        reduce = _time_of(prof, REDUCE_RANGE, on_gpu) / iters
        share = 100.0 * reduce / forward if forward else float("nan")
        head += f", of which in the reducer's steps {reduce / 1000:.3f} ms ({share:.0f}%)"
    else:
        head += " (the reducer's share is not separable: compiled kernels fuse across its steps)"
        if warm_seconds is not None:
            head += f"; compiled and warmed up in {warm_seconds:.1f} s"
    return head + "\n\n" + prof.key_averages().table(sort_by=sort_by, row_limit=rows) + "\n"


def parser() -> argparse.ArgumentParser:
    """The command line (``bench.gpu_session``'s profile step is checked against it)."""
    parser = argparse.ArgumentParser(prog="python -m bench.kernel_profile", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="none,fatr,tome", help="comma-separated method names (none: unreduced)")
    parser.add_argument("--model", default="deit_tiny_patch16_224", help="a timm ViT name")
    parser.add_argument("--batch", type=int, default=1, help="images per forward (default 1)")
    parser.add_argument(
        "--macs-ratio", type=float, default=0.65, help="the budget every method is matched to (default 0.65)"
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu (default: %(default)s)"
    )
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument(
        "--compile",
        default="eager",
        help=f"as bench.latency.compile runs the model: {', '.join(COMPILE_MODES)} (default eager)",
    )
    parser.add_argument("--iters", type=int, default=5, help="profiled forwards per method (default 5)")
    parser.add_argument("--rows", type=int, default=15, help="operators listed per method")
    parser.add_argument("--out", type=Path, help="write the report here (default: print it)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    try:
        if args.batch < 1 or args.iters < 1 or args.rows < 1:
            raise BenchError("--batch, --iters and --rows must be at least 1")
        if not methods:
            raise BenchError("--methods names no method")
        if not 0 < args.macs_ratio <= 1:
            raise BenchError(f"--macs-ratio must be in (0, 1], got {args.macs_ratio}")
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise BenchError(f"--device {args.device} is not a device; use cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BenchError(f"--device {args.device} but CUDA is not available here")
        if args.compile not in COMPILE_MODES:
            raise BenchError(f"--compile {args.compile}: choose from {', '.join(COMPILE_MODES)}")
        if args.compile in GPU_ONLY_MODES and device.type != "cuda":
            raise BenchError(f"--compile {args.compile} needs a CUDA device (CUDA graphs); this runs on {device.type}")
        name = (
            torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        )
        dtype = "bf16 autocast" if args.amp else "fp32"
        how = COMPILE_TEXT[args.compile]
        text = [
            f"# Operator profile: {args.model} (random weights), batch {args.batch}, {dtype}, {how}, "
            f"MACs ratio {args.macs_ratio}\n\ndevice: {name}; torch {torch.__version__}; commit {git_commit()}\n"
        ]
        for method in methods:
            model, _ = reduced_model(method, args.model, args.macs_ratio, mark=args.compile == "eager")
            x = torch.randn(args.batch, 3, *model.patch_embed.img_size, device=device)  # the model's own input size
            prof, warm = profile_forward(model.to(device), x, args.amp, args.iters, args.compile)
            text.append(report(method, prof, device.type == "cuda", args.iters, args.rows, args.compile, warm))
            print(f"profiled {method}", file=sys.stderr, flush=True)
    except (BenchError, UnsupportedModelError, ReducerConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(text))
    else:
        print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
