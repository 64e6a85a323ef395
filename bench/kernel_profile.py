"""``python -m bench.kernel_profile``: where a reduced forward's time goes, operator by operator.

The speed table says *that* a reducer is slow at some setting; this says *why*: for each method
at a MACs budget it profiles a few eager forwards with ``torch.profiler`` and writes the share
of the forward spent inside the reducer's steps (``reducer.reduce``, marked with a profiler
range) and the operators that cost the most (self device time on a GPU, self CPU time on the
CPU). It is a diagnostic for the people changing the reducers, not a benchmark: profiling
slows every operator down, so its milliseconds are not latencies; ``bench.run`` measures those.

Random weights (a reducer's cost does not depend on them); the device, dtype and batch are
named in every table. ``bench.gpu_session`` runs it on a borrowed GPU.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.autograd import DeviceType

from bench.budget import solve_budget
from bench.errors import BenchError
from bench.job import build_reducer_from_config
from bench.models import load_model
from bench.report.labels import METHOD_CONF
from bench.store import git_commit
from methods import TokenReducer, UnsupportedModelError, apply_reducer

REDUCE_RANGE = "reducer.reduce"


def reduced_model(method: str, model_name: str, macs_ratio: float) -> tuple[torch.nn.Module, TokenReducer]:
    """``model_name`` (random weights) with ``method``'s reducer at ``macs_ratio``; every call
    to the reducer's ``reduce`` is wrapped in the profiler range :data:`REDUCE_RANGE`."""
    path = METHOD_CONF / f"{method}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in METHOD_CONF.glob("*.yaml"))
        raise BenchError(f"unknown method {method!r}; choose from {', '.join(known)}")
    model = load_model(model_name, random_init=True)
    reducer = build_reducer_from_config(OmegaConf.load(path))
    reducer, _ = solve_budget(reducer, macs_ratio, 0.02, model, method)
    inner = reducer.reduce

    def reduce(state, block):
        with torch.profiler.record_function(REDUCE_RANGE):
            return inner(state, block)

    reducer.reduce = reduce  # type: ignore[method-assign]
    return apply_reducer(model, reducer), reducer


def profile_forward(model: torch.nn.Module, x: torch.Tensor, amp: bool, iters: int) -> torch.profiler.profile:
    """``iters`` profiled eager forwards after two unprofiled ones."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if x.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp)
    with torch.inference_mode(), autocast:
        for _ in range(2):
            model(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(iters):
                with torch.profiler.record_function("forward"):
                    model(x)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
    return prof


def _time_of(prof: torch.profiler.profile, name: str, device: bool) -> float:
    """Total microseconds of the profiler range ``name``: on a GPU the summed time of the kernels
    launched inside it (the range's host-side event; its device-side twin spans the gaps between
    kernels too, which an eager forward has and a CUDA graph does not), else its CPU time."""
    total = 0.0
    for event in prof.events():
        if event.name == name and event.device_type == DeviceType.CPU:
            total += event.device_time_total if device else event.cpu_time_total
    return total


def report(method: str, prof: torch.profiler.profile, on_gpu: bool, iters: int, rows: int) -> str:
    """One method's section: the forward's time per call, the reducer's share, the top operators."""
    forward = _time_of(prof, "forward", on_gpu) / iters
    reduce = _time_of(prof, REDUCE_RANGE, on_gpu) / iters
    share = 100.0 * reduce / forward if forward else float("nan")
    sort_by = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    clock = "kernel time, launch gaps left out" if on_gpu else "CPU time"
    head = (
        f"## {method}\n\nper forward ({clock}, under the profiler): {forward / 1000:.3f} ms, "
        f"of which in the reducer's steps {reduce / 1000:.3f} ms ({share:.0f}%)\n\n"
    )
    return head + prof.key_averages().table(sort_by=sort_by, row_limit=rows) + "\n"


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
        name = (
            torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        )
        dtype = "bf16 autocast" if args.amp else "fp32"
        text = [
            f"# Operator profile: {args.model} (random weights), batch {args.batch}, {dtype}, eager, "
            f"MACs ratio {args.macs_ratio}\n\ndevice: {name}; torch {torch.__version__}; commit {git_commit()}\n"
        ]
        for method in methods:
            model, _ = reduced_model(method, args.model, args.macs_ratio)
            x = torch.randn(args.batch, 3, *model.patch_embed.img_size, device=device)  # the model's own input size
            prof = profile_forward(model.to(device), x, args.amp, args.iters)
            text.append(report(method, prof, device.type == "cuda", args.iters, args.rows))
            print(f"profiled {method}", file=sys.stderr, flush=True)
    except (BenchError, UnsupportedModelError) as e:
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
