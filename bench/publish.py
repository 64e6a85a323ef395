"""``python -m bench.publish``: regenerate the committed reference results in ``results/``.

``bench.run`` writes to a git-ignored folder (``results/local`` by default), so trying the
harness never touches the published results. This command is the one way to rewrite them: it
runs the reference sweeps below, each a ``bench.run`` command with ``results_dir=results``, then
regenerates the leaderboard and the numbers the README and docs quote (``SUMMARY.md``'s generated
blocks, :mod:`bench.report.summary`). ``--fresh`` first moves the old store aside (into
``results/local/``), so the published files hold only the new runs and the fine-tuned records
carried over (``bench.finetune`` made those; this command cannot rerun them); ``--dry-run``
prints the commands.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from bench.store import RUNS_FILE, append_record, read_records

ALL_METHODS = "fatr,tome,evit,pool,kmedoids,dpcknn,topk,random,pitome,tofu,mctf,ppt,ats,zerotprune,dct,diffrate"
QUICK = ["bench.scaling.enabled=false", "bench.spectral.enabled=false"]
OMEGA = "results/omega/fatr_deit_tiny_signed_dc2_macs0.65.pt"

EARLIER_FATR = ["method.reducer.dc_grid=2", "method.reducer.prop_attn=true", "method.reducer.omega2_form=logit"]
"""FATR as this project ran it before it followed the paper (dc_grid 2, proportional attention)."""
FIDELITY = ["method=fatr", "budget.macs_ratio=0.65,0.5", *QUICK]

SCALING = "bench.scaling.resolutions=[224,384,512]"
"""Batch-1 latency up to 512 px: the 768 and 1024 px points cost most of a job on a 2-core CPU."""

REFERENCE_SWEEPS: list[tuple[str, list[str]]] = [
    ("every method at MACs 0.65, every measurement", [f"method={ALL_METHODS}", SCALING]),
    ("FATR fidelity: the earlier defaults at 0.65 and 0.50", [*FIDELITY, *EARLIER_FATR]),
    ("FATR fidelity: one change at a time from the paper default", [*FIDELITY, "method.reducer.dc_grid=2"]),
    ("FATR fidelity: proportional attention on", [*FIDELITY, "method.reducer.prop_attn=true"]),
    ("FATR fidelity: attention-weighted DC tokens", [*FIDELITY, "method.reducer.dc_weight=attn"]),
    (
        "FATR fidelity: the seed's SVD score, exact and 2-3 power iterations, both DC weights",
        [
            *FIDELITY,
            "method.reducer.score=svd",
            "method.reducer.svd_iters=null,2,3",
            "method.reducer.dc_weight=mean,attn",
        ],
    ),
    ("every method at MACs 0.50 and 0.80", [f"method={ALL_METHODS}", "budget.macs_ratio=0.5,0.8", *QUICK]),
    (
        "FATR, earlier defaults with the ω calibrated for them, at 0.65",
        ["method=fatr", *EARLIER_FATR, f"method.reducer.omega_path={OMEGA}", *QUICK],
    ),
    ("FATR score variants at 0.65", ["method=fatr", "method.reducer.score=abs,std", *QUICK]),
    ("every method at its own default knob", [f"method={ALL_METHODS}", "budget.macs_ratio=null", *QUICK]),
]
"""The published configurations, on the default model and data (DeiT-Tiny, the 1300
ImageNet validation images)."""

SPEED_ONLY = ["model.random_init=true", "bench.accuracy=false", "bench.spectral.enabled=false", *QUICK[:1]]
SPEED_SWEEPS: list[tuple[str, list[str]]] = [
    (
        f"speed of every method at MACs 0.65 on {model}, {mode}",
        [f"method={ALL_METHODS}", f"model={model}", *SPEED_ONLY, f"bench.latency.compile={mode}"],
    )
    for mode in ("eager", "compile")
    for model in ("deit_tiny", "deit_small", "deit_base")
] + [
    (
        "speed of every method at MACs 0.65 on deit_tiny, cpp-wrapper",
        [f"method={ALL_METHODS}", "model=deit_tiny", *SPEED_ONLY, "bench.latency.compile=cpp-wrapper"],
    )
]
"""The published speed table (``results/speed/``): latency only, so random weights stand in for
the sizes that have no real ones here (speed does not depend on the weights' values). Every
eager sweep first: compiling costs minutes per model on a small CPU, and a table stopped
part-way (each job's record is kept) then has every size in at least one mode. The C++-wrapper
compile last and on DeiT-Tiny only, the model the speed targets are set on: its compiles take
the longest, and what it removes (the Python wrapper's cost per kernel call) matters where a
forward is short."""


def commands(
    results_dir: str, extra: list[str], sweeps: list[tuple[str, list[str]]] = REFERENCE_SWEEPS
) -> list[tuple[str, list[str]]]:
    return [
        (what, [sys.executable, "-m", "bench.run", *overrides, f"results_dir={results_dir}", *extra])
        for what, overrides in sweeps
    ]


def record_count(results_dir: str | Path) -> int:
    """Records in the run store. A first sweep (every method on the default model) that adds
    none was refused before its first job (a bad override, no images, no device) or failed in
    every job: so would the sweeps after it. A later sweep may fail for reasons of its own (a
    model size, a compile mode), and the ones after it still run."""
    runs = Path(results_dir) / RUNS_FILE
    if not runs.is_file():
        return 0
    with runs.open("rb") as f:
        return sum(1 for line in f if line.strip())


def move_aside(results_dir: Path) -> Path | None:
    """Move the old run store and per-image outcomes into ``results/local/published-<time>/``,
    then carry back the records this command cannot regenerate: fine-tuned ones (made by
    ``bench.finetune``, whose checkpoints are not kept), with their outcome files, unchanged."""
    old = [p for p in (results_dir / RUNS_FILE, results_dir / "preds") if p.exists()]
    if not old:
        return None
    archive = Path("results/local") / f"published-{dt.datetime.now():%Y-%m-%d_%H-%M-%S}"
    archive.mkdir(parents=True)
    for p in old:
        shutil.move(str(p), archive / p.name)
    for record in read_records(archive):
        if "finetune" not in record:
            continue
        outcomes = record.get("metrics", {}).get("outcomes_file")
        if outcomes and (archive / outcomes).is_file():
            (results_dir / outcomes).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(archive / outcomes, results_dir / outcomes)
        append_record(results_dir, record)
    return archive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.publish", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", default=None, help="where the published results live (results, results/speed)")
    parser.add_argument("--speed", action="store_true", help="the speed table: DeiT-T/S/B, latency only")
    parser.add_argument("--fresh", action="store_true", help="start a new store (the old one is moved aside)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every sweep, e.g. device=cuda")
    args = parser.parse_args(argv)
    args.results_dir = args.results_dir or ("results/speed" if args.speed else "results")
    todo = commands(args.results_dir, args.overrides, SPEED_SWEEPS if args.speed else REFERENCE_SWEEPS)
    if args.dry_run:
        for what, cmd in todo:
            print(f"# {what}\npython {shlex.join(cmd[1:])}")
        return 0
    if args.fresh and (archive := move_aside(Path(args.results_dir))):
        print(f"old run store moved to {archive}")
    failed, not_run = [], 0
    before = record_count(args.results_dir)  # the first sweep's measure of having recorded anything
    for i, (what, cmd) in enumerate(todo):
        print(f"\n== {what}: python {shlex.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd).returncode == 0:
            continue
        failed.append(what)
        if i == 0 and record_count(args.results_dir) == before and (left := len(todo) - 1):
            print(
                f"error: the first sweep recorded nothing; the {left} sweep(s) after it take the same overrides, "
                "images and device, so none was run (fix the error above and publish again)",
                file=sys.stderr,
            )
            not_run = left
            break
    from bench.leaderboard import SUMMARY_FILE, sync_documents, write_leaderboard

    write_leaderboard(args.results_dir)
    if not args.speed:
        for path in sync_documents(Path(args.results_dir) / SUMMARY_FILE):
            print(f"generated numbers updated in {path}")
        from bench.errors import BenchError
        from bench.visualize import write_token_maps

        try:
            print(f"token maps: {write_token_maps(args.results_dir, ALL_METHODS, args.overrides)}")
        except BenchError as e:
            failed.append(f"token maps ({e})")
    if failed:
        skipped = f" ({not_run} not run)" if not_run else ""
        print(f"\n{len(failed)} sweep(s) failed{skipped}: {'; '.join(failed)}", file=sys.stderr)
        return 2
    print(f"\npublished results regenerated in {args.results_dir}/: look at every plot before committing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
