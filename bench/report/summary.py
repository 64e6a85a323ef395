"""``SUMMARY.md``: the few published numbers people quote, generated with the leaderboard.

Prose that copies a number by hand goes stale the moment the results are regenerated. So the
README and the docs quote published numbers only inside generated blocks::

    <!-- summary:headline -->
    ...a section of SUMMARY.md, written by ``python -m bench.leaderboard results --docs``...
    <!-- /summary:headline -->

:func:`summary_sections` renders each section from the leaderboard's table (one row per
configuration, statistics added), :func:`sync_blocks` copies them into the files, and a test
regenerates the sections from ``results/runs.jsonl`` and fails when a block disagrees.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from bench.report.latency import baseline_span, column_title, split_batch, summary_columns
from bench.report.significance import GROUP_KEYS, MISSING
from bench.report.targets import has_target_rows, targets_section

HEADLINE_BUDGET = 0.65
"""The budget of the headline table: the one every measurement is published at."""
PAPER_FILE = Path(__file__).with_name("paper_reported.csv")
"""What each method's paper reports training-free (model, top-1, GFLOPs, where it says so)."""
SECTIONS = ("headline", "papers", "speed_targets")
BLOCK = re.compile(r"(<!-- summary:(?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- /summary:(?P=name) -->)", re.DOTALL)


def group_rows(df: pd.DataFrame, group: tuple | None) -> pd.DataFrame:
    """The rows of one leaderboard group: ``group`` holds its :data:`GROUP_KEYS` values, as
    :func:`~bench.report.significance.record_group` gives them for the group the leaderboard's
    single-figure sections describe (:func:`~bench.report.significance.primary_group`)."""
    if group is None or df.empty:
        return df.iloc[0:0]
    mask = pd.Series(True, index=df.index)
    for key, value in zip(GROUP_KEYS, group, strict=True):
        column = df[key] if key in df else pd.Series(None, index=df.index, dtype=object)
        mask &= column.isna() if _missing(value) else column == value
    return df[mask]


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _pct(v: Any) -> str:
    return MISSING if _missing(v) else f"{v:.2f}"


def _interval(lo: Any, hi: Any, signed: bool = False) -> str:
    if _missing(lo) or _missing(hi):
        return MISSING
    f = "{:+.2f}" if signed else "{:.2f}"
    return f"[{f.format(lo)}, {f.format(hi)}]"


def _plain_rows(part: pd.DataFrame) -> pd.DataFrame:
    """Each method's own configuration (not a variant: the label is the bare method name)."""
    if part.empty or "label" not in part or "method" not in part:
        return part.iloc[0:0]
    return part[part["label"] == part["method"]]


def group_line(part: pd.DataFrame, shown: pd.DataFrame) -> str:
    """The headline's settings: model, data, the device and mode of its latency and, over the
    ``shown`` rows, the days it was timed (a row's latency is from the run that last timed it,
    and a contended host's ratios differ from a quiet one's, so the day is part of the figure)."""
    row = part.iloc[0]
    images = row.get("images")
    count = MISSING if _missing(images) else int(images)
    return (
        f"{row.get('model')} on {row.get('dataset')} ({count} images); latency on {row.get('device')}, "
        f"{row.get('latency_mode')}{timed_days(shown)}; 95% intervals paired over images."
    )


def timed_days(rows: pd.DataFrame) -> str:
    """``, timed 2026-12-05`` or ``, timed 2026-11-26 to 2026-12-05`` (UTC days of the rows'
    latency records); empty where no row was timed or records predate the field."""
    if "latency_timed" not in rows:
        return ""
    days = sorted({str(t)[:10] for t in rows["latency_timed"] if isinstance(t, str) and t})
    if not days:
        return ""
    return f", timed {days[0]}" if len(days) == 1 else f", timed {days[0]} to {days[-1]}"


def headline(df: pd.DataFrame, group: tuple | None) -> list[str]:
    """Every method of ``group`` at the headline budget, best top-1 first, next to the unreduced model."""
    part = group_rows(df, group)
    if part.empty or "top1" not in part:
        return ["No accuracy records yet."]
    at_budget = _plain_rows(part[(part["budget"] - HEADLINE_BUDGET).abs() < 1e-9])
    unreduced = part[part["method"] == "none"]
    rows = pd.concat([unreduced.head(1), at_budget.sort_values("top1", ascending=False)])
    speed = [c for c in summary_columns(part) if c in rows and c.startswith("speedup")]
    head = ["method", "top-1 % [95% CI]", "Δ vs unreduced [95% CI]", "vs best", "agree %", "GMACs"]
    head += [column_title(c, {"speedup": "speedup"}) for c in speed]
    lines = [
        f"Every method at {HEADLINE_BUDGET:.0%} of the unreduced model's MACs: {group_line(part, rows)}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    marks = {"best": "best", "tied": "tied", "below": "below"}
    for _, r in rows.iterrows():
        reduced = r["method"] != "none"
        cells = [
            r["label"] if reduced else "none (unreduced)",
            f"{_pct(r['top1'])} {_interval(r.get('top1_lo'), r.get('top1_hi'))}",
            f"{r['d_unreduced']:+.2f} {_interval(r.get('d_unreduced_lo'), r.get('d_unreduced_hi'), True)}"
            if reduced and not _missing(r.get("d_unreduced"))
            else MISSING,
            marks.get(r.get("top1_tied"), MISSING) if reduced else MISSING,
            _pct(r.get("agreement")) if reduced else MISSING,
            MISSING if _missing(r.get("gmacs")) else f"{r['gmacs']:.3f}",
            *(MISSING if _missing(r.get(c)) or not reduced else f"{r[c]:.2f}×" for c in speed),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += [
        "",
        "vs best: `best`, `tied` (the paired interval of the difference to the best includes 0) or `below`. "
        "Speedups: median of per-iteration ratios against the unreduced model, timed in alternation."
        + baseline_note(rows[rows["method"] != "none"], speed)
        + untimed_note(rows[rows["method"] != "none"], speed),
    ]
    return lines


def baseline_note(rows: pd.DataFrame, speed: list[str]) -> str:
    """The range of the unreduced model's own forward over the jobs that timed the ``speed``
    columns (how loaded the host was; the speed table's unreduced rows are the quieter comparison)."""
    batches = [split_batch(c)[1] for c in speed]
    parts = [f"{span} at batch {n}" for n in batches if (span := baseline_span(rows, n))]
    if not parts:
        return ""
    return (
        " Each speedup divides by the unreduced forward timed in its own job: "
        + ", ".join(parts)
        + " (a busier host reads slower)."
    )


def untimed_note(rows: pd.DataFrame, speed: list[str]) -> str:
    """Why a speed cell is empty, when one is: each row's latency comes from the run that last
    timed it, and runs from before batch-size lists timed one batch only (a row no run timed is
    empty too)."""
    empty = [c for c in speed if rows[c].isna().any()]
    if not empty:
        return ""
    titles = ", ".join(column_title(c, {"speedup": "speedup"}) for c in empty)
    return (
        f" `–` under {titles}: no run timed that row at that batch size; "
        "the speed table (`results/speed/`) times every method at batch 1 and the batch default."
    )


def paper_rows(path: Path = PAPER_FILE) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def papers(df: pd.DataFrame, group: tuple | None, path: Path = PAPER_FILE) -> list[str]:
    """What each paper reports training-free (its models, its hardware), next to what this
    harness measures on its own model at the headline budget and at the method's default knob."""
    part = _plain_rows(group_rows(df, group))
    model = part["model"].iloc[0] if not part.empty else MISSING
    head = [
        "method",
        "paper: model",
        "paper: top-1 % (unreduced)",
        "paper: GFLOPs",
        "source",
        f"here ({model}): top-1 % at MACs {HEADLINE_BUDGET} (Δ vs unreduced)",
        "here: at its default knob (MACs ratio)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in paper_rows(path):
        rows = part[part["method"] == p["method"]] if not part.empty else part
        budget = rows["budget"] if "budget" in rows else pd.Series(dtype=float)
        at = rows[(budget - HEADLINE_BUDGET).abs() < 1e-9]
        own = rows[budget.isna()]
        here = MISSING
        if not at.empty and "top1" in at:
            r = at.iloc[0]
            delta = r.get("d_unreduced")
            here = f"{_pct(r['top1'])} ({MISSING if _missing(delta) else f'{delta:+.2f}'})"
        default = MISSING
        if not own.empty and "top1" in own:
            r = own.iloc[0]
            ratio = r.get("macs_ratio")
            default = f"{_pct(r['top1'])} ({MISSING if _missing(ratio) else f'{ratio:.2f}'})"
        reported = f"{p['top1']} ({p['unreduced_top1'] or MISSING})" if p["top1"] else MISSING
        cells = [p["method"], p["model"] or MISSING, reported, p["gflops"] or MISSING, p["source"], here, default]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "The papers' numbers are on their own models and hardware; they are quoted, not measured here."]
    return lines


def summary_sections(df: pd.DataFrame, group: tuple | None) -> dict[str, str]:
    """Each section's markdown body (the rows of ``group``), keyed by the name its generated blocks use."""
    sections = {"headline": "\n".join(headline(df, group)) + "\n", "papers": "\n".join(papers(df, group)) + "\n"}
    if has_target_rows(df):  # a folder with speed rows at a target's settings
        sections["speed_targets"] = "\n".join(targets_section(df)) + "\n"
    return sections


def summary_markdown(sections: dict[str, str]) -> str:
    titles = {
        "headline": "The headline",
        "papers": "What the papers report, and what this harness measures",
        "speed_targets": "Speed targets",
    }
    out = [
        "# Summary",
        "",
        "Generated by `python -m bench.leaderboard` from the `runs.jsonl` in this folder, with the leaderboard. "
        "Do not edit by hand; the README and `docs/` quote these sections through generated blocks.",
        "",
    ]
    for name in (n for n in SECTIONS if n in sections):
        out += [f"## {titles[name]}", "", f"<!-- summary:{name} -->", sections[name] + f"<!-- /summary:{name} -->", ""]
    return "\n".join(out)


def read_sections(summary_file: Path) -> dict[str, str]:
    """The sections of a written ``SUMMARY.md``."""
    return {m["name"]: m["body"] for m in BLOCK.finditer(summary_file.read_text())}


def sync_blocks(path: Path, sections: dict[str, str]) -> bool:
    """Replace every generated block in ``path`` with its section; True if the file changed.
    A block naming a section that does not exist is left as it is (the test reports it)."""
    text = path.read_text()
    new = BLOCK.sub(lambda m: m[1] + sections.get(m["name"], m["body"]) + m[4], text)
    if new != text:
        path.write_text(new)
    return new != text


def stale_blocks(path: Path, sections: dict[str, str]) -> list[str]:
    """Names of the generated blocks in ``path`` that differ from (or lack) their section."""
    return [m["name"] for m in BLOCK.finditer(path.read_text()) if sections.get(m["name"]) != m["body"]]


def documents(repo: Path) -> list[Path]:
    """The files that may hold generated blocks: the README and every docs page."""
    return [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]
