"""Regenerate ``results/leaderboard.{md,csv}`` and the plots from every recorded run.

Never edited by hand: the files are a pure function of ``runs.jsonl`` (latest record per
config), so re-running this reproduces them exactly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from bench.report.labels import RANDOM_WEIGHTS, display_name, knob_text, model_label
from bench.report.latency import (
    BF16,
    EAGER,
    base_column,
    batch_columns,
    batch_metrics,
    column_title,
    compile_lines,
    is_latency_metric,
    latency_mode,
    latency_precision,
    section_columns,
    summary_columns,
)
from bench.report.row_notes import GROUPS, measured_settings, note_lines, row_name, settings_lines
from bench.report.significance import (
    GROUP_KEYS,
    MISSING,
    add_statistics,
    group_title,
    primary_group,
    record_group,
    statistics_lines,
)
from bench.store import config_hash, read_run_records

SUMMARY_FILE = "SUMMARY.md"
REPO = Path(__file__).resolve().parents[1]
"""The repository: its README and docs/ quote the SUMMARY.md of its results/ (``--docs``)."""

COLUMNS = {
    "label": "method",
    "budget": "MACs target",
    "knob": "knob",
    "top1": "top-1 %",
    "top1_ci": "top-1 95% CI",
    "delta_top1": "Δ top-1",
    "top5": "top-5 %",
    "agreement": "agree %",
    "gmacs": "GMACs",
    "gmacs_analytic": "GMACs (analytic)",
    "macs_ratio": "MACs ratio",
    "latency_ms": "ms/batch",
    "img_per_s": "img/s",
    "speedup": "speedup",
    "speedup_iqr": "speedup IQR",
    "speedup_efficiency": "speedup eff.",
    "peak_mem_mb": "forward peak MiB",
}
RAW_METRICS = (
    "outcomes_file",
    "speedup_q1",
    "speedup_q3",
    "latency_busy_reason",
    "compile_seconds",
    "latency_compile_agreement",
    "latency_compile_note",
)
"""Metrics the statistics need that the tables do not show (the compile columns: compiled rows' tables only)."""


def result_key(record: dict[str, Any]) -> str:
    """What a leaderboard row stands for: method, settings, budget, model, data and the machine
    it ran on (another machine's record never replaces this one's) — but not which
    measurements a run switched on, so that a run measuring accuracy only and a run measuring
    everything for the same configuration fill one row. Latency timed compiled is another row
    than latency timed eagerly (``bench.latency.compile``), and bf16 autocast another than fp32
    (``bench.latency.amp``): their speedups never mix."""
    config = record.get("config")
    if not isinstance(config, dict):
        return str(record.get("config_hash"))
    mode = latency_mode(record)
    timing = {"latency_compile": mode} if mode != EAGER else {}  # eager fp32 rows keep their old keys
    if latency_precision(record) == BF16:
        timing["latency_precision"] = BF16
    return config_hash(
        {**{k: v for k, v in config.items() if k != "bench"}, "device_name": record.get("device"), **timing}
    )


def latest_per_config(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per configuration: each metric from the newest record that measured it (the
    latency metrics all from the newest record that timed latency, so batch sizes of two runs
    never share a row)."""
    merged: dict[str, dict[str, Any]] = {}
    for r in sorted(records, key=lambda r: r.get("timestamp", "")):
        key = result_key(r)
        timed = "latency_ms" in r.get("metrics", {})
        # when the row's latency was timed: a later record that timed nothing does not move it
        latency_timed = r.get("timestamp") if timed else merged.get(key, {}).get("_latency_timed")
        if key not in merged:
            metrics = dict(r.get("metrics", {}))
            settings = measured_settings(r)
        else:
            older = merged[key]["metrics"]
            if timed:
                older = {k: v for k, v in older.items() if not is_latency_metric(k)}
            metrics = {**older, **r.get("metrics", {})}
            settings = {**merged[key]["_settings"], **measured_settings(r)}
        merged[key] = {**r, "metrics": metrics, "_settings": settings, "_latency_timed": latency_timed}
    return list(merged.values())


def table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per config (latest record), flat columns, sorted by budget then top-1."""
    rows = []
    for r in latest_per_config(records):
        m = without_graph_memory(r.get("metrics", {}))
        b = r.get("budget", {})
        knob = knob_text(r)
        row = {
            "label": display_name(r),
            "model": model_label(r),  # "(random weights)": a timing-only row, its own group
            "dataset": Path(r.get("data_root", "")).name,
            "images": r.get("num_images"),
            "device": r.get("device"),
            "torch": r.get("torch"),  # records from before it was recorded: None
            "latency_mode": latency_mode(r),
            "latency_precision": latency_precision(r),
            "method": r.get("method"),
            "budget": b.get("macs_ratio_target"),
            "knob": knob,
            "commit": r.get("git_commit"),
            "timestamp": r.get("timestamp"),
            "latency_timed": r.get("_latency_timed"),  # the timestamp of the record the latency is from
            "config_hash": r.get("config_hash"),
            "notes": " ".join(r.get("notes") or []),
            **{f"{g}_settings": r.get("_settings", {}).get(g) for g in GROUPS},
        }
        identity = list(row)
        row.update({k: m[k] for k in (*COLUMNS, *RAW_METRICS) if k in m})
        row.update(batch_metrics(m))  # one column group per latency batch size
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    # A fixed column order (identity, then metrics as in COLUMNS), whichever record comes first.
    metric_cols = [c for c in (*COLUMNS, *RAW_METRICS) if c in df.columns and c not in identity]
    df = df[identity + metric_cols + batch_columns(df.columns)]
    df["_budget"] = df["budget"].fillna(2.0)  # unreduced first within a setting
    sort = ["model", "dataset", "images", "_budget"] + (["top1"] if "top1" in df else [])
    asc = [True, True, True, False] + ([False] if "top1" in df else [])
    return df.sort_values(sort, ascending=asc).drop(columns="_budget").reset_index(drop=True)


def without_graph_memory(m: dict[str, Any]) -> dict[str, Any]:
    """Metrics without peak memory where CUDA graphs ran: a replay allocates nothing (its pool
    was reserved when the graph was recorded), so records from before the timing loop knew it
    hold a peak of 0, which is not the forward's memory."""
    if m.get("latency_compile") != "cudagraphs":
        return m
    return {k: v for k, v in m.items() if not k.startswith("peak_mem_mb")}


def _fmt(v: Any, col: str) -> str:
    col = base_column(col)  # speedup_b32 is formatted as speedup
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return MISSING
    if col == "budget":
        return f"{v:.2f}"
    if col == "delta_top1":
        return f"{v:+.2f}"
    if isinstance(v, float):
        return (
            f"{v:.3f}"
            if col in ("gmacs", "gmacs_analytic", "macs_ratio", "speedup", "speedup_efficiency")
            else f"{v:.2f}"
            if abs(v) < 1e4
            else f"{v:.0f}"
        )
    return str(v)


def markdown(df: pd.DataFrame) -> str:
    lines = [
        "# Leaderboard",
        "",
        "Generated by `python -m bench.leaderboard` from the `runs.jsonl` in this folder "
        "(latest record per config). Do not edit by hand.",
        "",
    ]
    if df.empty:
        return "\n".join(lines + ["No runs recorded yet.", ""])
    for key, part in df.groupby(GROUP_KEYS, sort=False, dropna=False):
        cols = section_columns(part, [c for c in COLUMNS if c in df.columns])  # a column group per batch size
        commits = ", ".join(sorted(set(part["commit"].dropna())))
        lines += [
            f"## {group_title(key)}",
            "",
            f"Commits: {commits}.",
            "",
            "| " + " | ".join(column_title(c, COLUMNS) for c in cols) + " |",
            "|" + "|".join("---" for _ in cols) + "|",
        ]
        for _, row in part.iterrows():
            cells = [_fmt(row.get(c), c) + (" †" if c == "knob" and row.get("notes") else "") for c in cols]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        extra = note_lines(part) + settings_lines(part) + compile_lines(part, row_name)
        for line in extra:  # one paragraph each; list items stay under their heading line
            lines += [line] if line.startswith("- ") or lines[-1] == "" else ["", line]
        lines += [""] if extra else []
        lines += statistics_lines(part, df.attrs)
    lines += [
        "Columns: Δ top-1 is against the unreduced model measured in the same run; agree % is how often "
        "the top-1 prediction equals the unreduced model's; GMACs per image from fvcore (with attention "
        "counted) and from the analytic formula; ms/batch, img/s and speedup come once per latency batch size "
        "(b=1: one image at a time, the largest: throughput), each timed on its own; speedup is the median of "
        "per-iteration latency ratios against the unreduced model timed in alternation; speedup eff. = speedup × "
        "MACs ratio (1.0 = latency fell exactly as much as MACs); forward peak MiB is the tensor memory one "
        "forward of the largest latency batch allocates on top of the resident weights and inputs.",
        "",
    ]
    return "\n".join(lines)


def write_leaderboard(
    results_dir: str | Path, resample: str = "images", n_boot: int = 2000, seed: int = 0
) -> list[Path]:
    """Rewrite every generated file in ``results_dir`` from its runs; returns the paths.
    All files are replaced together, or none when generating any of them fails. ``resample``
    (images or classes), ``n_boot`` and ``seed`` set the paired statistics."""
    from bench.results_io import staged_outputs

    results_dir = Path(results_dir)
    everything = latest_per_config(read_run_records(results_dir))
    with staged_outputs(results_dir) as stage:
        paths = _generate(everything, results_dir, stage, resample, n_boot, seed)
    return [results_dir / p.relative_to(stage) for p in paths]


def _generate(
    everything: list[dict[str, Any]], source: Path, out: Path, resample: str, n_boot: int, seed: int
) -> list[Path]:
    """Every output file into ``out``; per-image outcomes are read from ``source``."""
    from bench.report.plots import plot_differences, plot_latency, plot_pareto
    from bench.report.scaling import scaling_section
    from bench.report.spectral import spectral_section
    from bench.report.speed import plot_speed_by_size, plot_speed_grid
    from bench.report.summary import summary_markdown, summary_sections
    from bench.report.variants import variants_section

    records = [r for r in everything if "finetune" not in r]  # fine-tuned models get their own section
    df = add_statistics(table(records), source, resample, n_boot, seed)
    md, csv = out / "leaderboard.md", out / "leaderboard.csv"
    md.write_text(markdown(df) + "\n".join(variants_section(records, source, resample, n_boot, seed)))
    df.to_csv(csv, index=False)
    main_group = primary_group(records)  # one figure each (and the summary): the group with the most images
    summary_file = out / SUMMARY_FILE
    summary_file.write_text(summary_markdown(summary_sections(df, record_group(main_group[0]) if main_group else None)))
    paths = [md, csv, summary_file]
    if not df.empty and "top1" in df and "gmacs" in df:
        paths.append(plot_pareto(df, out / "pareto.png"))
    if not df.empty and "top1" in df:
        paths.append(plot_differences(df, out / "differences.png"))
    if not df.empty and "speedup" in df:
        paths.append(plot_latency(df, out / "latency.png"))
        paths.append(plot_speed_by_size(df, out / "speed_by_size.png"))
        paths.append(plot_speed_grid(df, out / "speed_grid.png"))
    paths = [p for p in paths if p is not None]
    paths += spectral_section(main_group, out)
    paths += scaling_section(main_group, out)
    from bench.report.finetuned import finetuned_section

    paths += finetuned_section(everything, out, source, resample, n_boot, seed)
    list_figures(md, [p for p in paths if p.suffix == ".png" and p.parent == out])
    return paths


def list_figures(md: Path, figures: list[Path]) -> None:
    """Link the folder's figures under the leaderboard's opening paragraph: a reader who lands on
    the table (the README links it) finds the plots without browsing the folder."""
    if not figures:
        return
    head, sep, rest = md.read_text().partition("\n\n")  # the title
    intro, sep2, rest = rest.partition("\n\n")  # the opening paragraph
    links = " · ".join(f"[{p.name}]({p.name})" for p in sorted(figures))
    md.write_text(f"{head}{sep}{intro}{sep2}Figures: {links}.\n\n{rest}")


def sync_documents(summary_file: Path) -> list[Path]:
    """Copy the sections of ``summary_file`` into the generated blocks of the README and the
    docs (:mod:`bench.report.summary`); returns the files that changed."""
    from bench.report.summary import documents, read_sections, sync_blocks

    sections = read_sections(summary_file)
    return [p for p in documents(REPO) if p.is_file() and sync_blocks(p, sections)]


def summary(records: list[dict[str, Any]]) -> str:
    """A compact text table of the given records, for the end of a sweep."""
    df = table(records)
    if df.empty:
        return "no jobs recorded"
    random = df["model"].astype(str).str.endswith(f"({RANDOM_WEIGHTS})").any()  # then every row says so
    shown = (*(["model"] if random else []), "label", "budget", "knob", "top1", "delta_top1", "agreement", "gmacs")
    cols = [c for c in (*shown, *summary_columns(df)) if c in df]  # speedup per latency batch size
    df = df[cols].assign(**({"knob": df["knob"].map(lambda v: v or MISSING)} if "knob" in cols else {}))
    df = df.apply(_missing_as_dash)
    df = df.rename(columns=lambda c: column_title(c, COLUMNS))
    return df.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep=MISSING)


def _missing_as_dash(column: pd.Series) -> pd.Series:
    """A column pandas could not make numeric (every value None: a sweep at the methods' own
    knobs has no MACs target) prints its Nones as ``None``, not as ``na_rep``: make them the
    README's dash. Numeric columns keep their NaN, which ``na_rep`` prints."""
    if column.dtype != object:
        return column
    return column.map(lambda v: MISSING if v is None or (isinstance(v, float) and math.isnan(v)) else v)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.leaderboard [results_dir]``: re-render a results folder's leaderboard."""
    import argparse
    import os
    import sys

    from bench.errors import BenchError
    from bench.store import RUNS_FILE

    parser = argparse.ArgumentParser(
        prog="python -m bench.leaderboard", description="Regenerate the leaderboard, CSV and plots of a results folder."
    )
    parser.add_argument(
        "results_dir",
        nargs="?",
        default=os.environ.get("FATR_RESULTS_DIR", "results/local"),
        help="a folder bench.run recorded into (default: $FATR_RESULTS_DIR or results/local)",
    )
    parser.add_argument("--resample", default="images", help="images | classes (cluster bootstrap)")
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples of the intervals (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    parser.add_argument(
        "--docs",
        action="store_true",
        help="also rewrite the generated blocks of README.md and docs/*.md from this folder's SUMMARY.md",
    )
    args = parser.parse_args(argv)
    runs = Path(args.results_dir) / RUNS_FILE
    if not runs.is_file():  # a mistyped folder must not get an empty leaderboard written into it
        print(f"error: no runs recorded in {runs}; name a results folder that bench.run wrote to", file=sys.stderr)
        return 2
    quoted = REPO / "results"
    if args.docs and Path(args.results_dir).resolve() != quoted:
        # the README and docs quote the published results; another folder's headline would replace it
        print(
            f"error: --docs rewrites the README and docs from {quoted}, the folder they quote; "
            f"{args.results_dir} is another (drop --docs to regenerate its own leaderboard)",
            file=sys.stderr,
        )
        return 2
    try:
        for p in write_leaderboard(args.results_dir, args.resample, args.n_boot, args.seed):
            print(p)
        if args.docs:
            for p in sync_documents(Path(args.results_dir) / SUMMARY_FILE):
                print(p)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
