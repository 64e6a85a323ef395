"""``python -m bench.compare RUN_A RUN_B``: the paired comparison of two recorded runs.

A run is named by its config hash (or a unique prefix of one, as in ``leaderboard.csv``) or by
its method and budget as the leaderboard shows them: ``tome@0.65``, ``"fatr (score=std)@0.65"``,
``tome@own`` (the method's own knob), ``unreduced``. ``--images N`` and ``--device TEXT`` pick
among runs of one configuration on several image counts or machines. Both runs must have stored
their per-image outcomes, on the same images.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench.errors import BenchError
from bench.leaderboard import latest_per_config, result_key
from bench.measure.outcomes import Outcomes, load_outcomes
from bench.report.labels import display_name
from bench.report.significance import check_options
from bench.report.stats import bootstrap_for, discordance, wilson_interval
from bench.store import RUNS_FILE, read_records


def _budget(record: dict[str, Any]) -> float | None:
    return (record.get("budget") or {}).get("macs_ratio_target")


def describe_run(record: dict[str, Any]) -> str:
    b = _budget(record)
    at = "own knob" if b is None else f"@{b:.2f}"
    label = "unreduced" if record.get("method") == "none" else f"{display_name(record)} {at}"
    tuned = record.get("finetune")
    if isinstance(tuned, dict):
        label += (
            f" +ft (fine-tuned: {tuned.get('recipe_name')}, loss {tuned.get('loss')}, "
            f"{tuned.get('images_seen')} images seen)"
        )
    return f"{label} [{record.get('config_hash')}, {record.get('num_images')} images, {record.get('device')}]"


def resolve(spec: str, records: list[dict[str, Any]], images: int | None = None, device: str | None = None):
    """The one merged leaderboard row ``spec`` names; a clear error when none or several do."""
    rows = latest_per_config(records)
    if images is not None:
        rows = [r for r in rows if r.get("num_images") == images]
    if device:
        rows = [r for r in rows if device.lower() in str(r.get("device", "")).lower()]
    if records and not rows:
        wanted = []
        if images is not None:
            wanted.append(f"{images} images")
        if device:
            wanted.append(f"a device matching {device!r}")
        counts = [str(n) for n in sorted({r.get("num_images") for r in records}, key=lambda n: (n is None, n or 0))]
        devices = sorted({str(r.get("device")) for r in records})
        raise BenchError(
            f"no recorded run has {' and '.join(wanted)} "
            f"(recorded: {', '.join(counts)} images; on {'; '.join(devices)})"
        )
    found = []
    if re.fullmatch(r"[0-9a-f]{4,12}", spec):
        keys = {result_key(r) for r in records if str(r.get("config_hash", "")).startswith(spec)}
        found = [r for r in rows if result_key(r) in keys]
    if not found:
        # ``+ft`` names the fine-tuned model; without it a name means the off-the-shelf one, as the
        # leaderboard keeps fine-tuned runs in their own section.
        base, finetuned = (spec[: -len("+ft")], True) if spec.endswith("+ft") else (spec, False)
        candidates = [r for r in rows if ("finetune" in r) == finetuned]
        name, at, budget = base.partition("@")
        name = name.strip()
        if name in ("unreduced", "none"):
            found = [r for r in candidates if r.get("method") == "none"]
        else:
            found = [r for r in candidates if display_name(r) == name]
            found = found or [r for r in candidates if r.get("method") == name]
            if at:
                found = [r for r in found if _budget_matches(_budget(r), budget.strip(), spec)]
    if not found:
        known = sorted({describe_run(r) for r in rows})[:12]
        raise BenchError(
            f"no recorded run matches {spec!r}"
            + (f"; recorded runs include: {'; '.join(known)}" if known else "; no runs are recorded there")
        )
    if len(found) > 1:
        options = "; ".join(sorted(describe_run(r) for r in found))
        raise BenchError(
            f"{spec!r} is ambiguous: {len(found)} runs match ({options}); name one by its config hash, "
            "or add @budget, --images N or --device TEXT"
        )
    return found[0]


def _budget_matches(value: float | None, text: str, spec: str) -> bool:
    if text in ("own", "none", "null"):
        return value is None
    try:
        wanted = float(text)
    except ValueError:
        raise BenchError(f"{spec!r}: the budget after @ must be a number (like 0.65) or 'own'") from None
    return value is not None and abs(value - wanted) < 1e-9


def outcomes_for(record: dict[str, Any], results_dir: Path) -> Outcomes:
    rel = (record.get("metrics") or {}).get("outcomes_file")
    if not rel:
        raise BenchError(
            f"{describe_run(record)} has no per-image outcomes (recorded before they were stored, or with "
            "bench.accuracy=false); re-run it to compare it"
        )
    return load_outcomes(results_dir, rel)


def class_name(label: int) -> str:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    if 0 <= label < info.num_classes():
        return f"{info.index_to_label_name(label)} {info.index_to_description(label).split(',')[0]}"
    return str(label)


def compare(
    spec_a: str,
    spec_b: str,
    results_dir: str | Path,
    resample: str = "images",
    n_boot: int = 2000,
    seed: int = 0,
    images: int | None = None,
    device: str | None = None,
) -> str:
    """The report: Δ top-1 and Δ agreement with paired intervals, McNemar counts and p, and
    the ten classes whose correct counts differ most."""
    check_options(resample, n_boot, seed)
    if images is not None and (not isinstance(images, int) or isinstance(images, bool) or images <= 0):
        raise BenchError(f"--images must be a positive number of images, got {images!r}")
    results_dir = Path(results_dir)
    records = read_records(results_dir)
    if not records:
        raise BenchError(f"no runs recorded in {results_dir / RUNS_FILE}")
    a, b = (resolve(s, records, images, device) for s in (spec_a, spec_b))
    if result_key(a) == result_key(b):
        raise BenchError(f"{spec_a!r} and {spec_b!r} name the same run ({describe_run(a)})")
    oa, ob = outcomes_for(a, results_dir), outcomes_for(b, results_dir)
    if not oa.same_images(ob):
        raise BenchError(
            f"the two runs are on different images ({len(oa)} images from {a.get('data_root')} vs {len(ob)} from "
            f"{b.get('data_root')}): a paired comparison needs the same images"
        )
    boot = bootstrap_for(oa.label, resample, n_boot, seed)
    unit = "whole classes (cluster bootstrap)" if resample == "classes" else "images"
    n = len(oa)
    lines = [f"A: {describe_run(a)}", f"B: {describe_run(b)}", ""]
    for name, o in (("A", oa), ("B", ob)):
        iv = (wilson_interval(int(o.correct.sum()), n) if resample == "images" else boot.mean(o.correct)).scaled(100)
        lines.append(f"top-1 {name}: {iv.estimate:.2f} %  95% interval [{iv.low:.2f}, {iv.high:.2f}]")
    lines.append("")
    for what, xa, xb in (("top-1", oa.correct, ob.correct), ("agreement with unreduced", oa.agree, ob.agree)):
        iv = boot.paired(xa, xb).scaled(100)
        t = discordance(xa, xb)
        verdict = "cannot be told apart (interval includes 0)" if iv.contains(0.0) else "differ"
        lines += [
            f"Δ {what} (A − B): {iv.estimate:+.2f} points, 95% interval [{iv.low:+.2f}, {iv.high:+.2f}] "
            f"(paired bootstrap over {unit}, {n_boot} resamples, seed {seed}): {verdict}",
            f"  McNemar: both {t.both}, only A {t.only_a}, only B {t.only_b}, neither {t.neither}; "
            f"exact two-sided p = {t.p_value:.4g}",
        ]
    lines += ["", *_class_lines(oa, ob)]
    return "\n".join(lines)


def _class_lines(oa: Outcomes, ob: Outcomes, top: int = 10) -> list[str]:
    labels = np.unique(oa.label)
    rows = []
    for c in labels:
        mask = oa.label == c
        ra, rb = int(oa.correct[mask].sum()), int(ob.correct[mask].sum())
        if ra != rb:
            rows.append((-abs(ra - rb), int(c), int(mask.sum()), ra, rb))
    if not rows:
        return ["No class differs in how many images A and B get right."]
    out = [
        f"Classes that differ most (of {len(labels)}; images right per class):",
        f"  {'class':<40} {'images':>6} {'A':>4} {'B':>4} {'A − B':>6}",
    ]
    for _, c, m, ra, rb in sorted(rows)[:top]:
        out.append(f"  {class_name(c)[:40]:<40} {m:>6} {ra:>4} {rb:>4} {ra - rb:>+6}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare", description="Paired comparison of two recorded runs on the same images."
    )
    parser.add_argument(
        "run_a",
        help="config hash (prefix) or method@budget, e.g. tome@0.65, unreduced; tome@0.65+ft: the fine-tuned one",
    )
    parser.add_argument("run_b", help="the run to compare it with, named the same ways")
    parser.add_argument(
        "--results-dir",
        default=os.environ.get("FATR_RESULTS_DIR", "results/local"),
        help="where the runs were recorded (default: $FATR_RESULTS_DIR or results/local)",
    )
    parser.add_argument("--resample", default="images", help="images | classes (cluster bootstrap)")
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    parser.add_argument("--images", type=int, default=None, help="only runs on this many images")
    parser.add_argument("--device", default=None, help="only runs whose device name contains this text")
    args = parser.parse_args(argv)
    try:
        print(
            compare(
                args.run_a,
                args.run_b,
                args.results_dir,
                args.resample,
                args.n_boot,
                args.seed,
                args.images,
                args.device,
            )
        )
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
