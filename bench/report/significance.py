"""The leaderboard's statistics: which differences between its rows are real.

Rows are compared only within one group (model, data set, image count, device) and, for
rankings, within one MACs budget. Every comparison is paired on the same images, from the
per-image outcomes each accuracy job stores (:mod:`bench.measure.outcomes`); rows recorded before those
existed still render, marked, with what can be said without them (a Wilson interval for their
top-1 when resampling images).
"""

from __future__ import annotations

import math
import statistics
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import BenchError
from bench.measure.outcomes import Outcomes, load_outcomes
from bench.report.labels import model_label
from bench.report.latency import latency_mode, latency_precision, mode_heading
from bench.report.stats import RESAMPLE_UNITS, Bootstrap, bootstrap_for, detectable_delta, discordance, wilson_interval

GROUP_KEYS = ["model", "dataset", "images", "device", "latency_mode", "latency_precision"]
"""Rows that may share a table, a ranking or a plot line: never across these (latency_mode:
eager or compiled, ``bench.latency.compile``; latency_precision: fp32 or bf16 autocast;
speedups timed differently never compare)."""
MISSING = "–"
NO_OUTCOMES = "no per-image outcomes"
OTHER_IMAGES = "other images than the unreduced row"
LEVEL = 0.95


def check_options(resample: str = "images", n_boot: int = 2000, seed: int = 0) -> None:
    if resample not in RESAMPLE_UNITS:
        raise BenchError(f"stats.resample must be one of {', '.join(RESAMPLE_UNITS)}, got {resample!r}")
    if not isinstance(n_boot, int) or isinstance(n_boot, bool) or n_boot < 100:
        raise BenchError(f"stats.n_boot must be an integer of at least 100, got {n_boot!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise BenchError(f"stats.seed must be a non-negative integer, got {seed!r}")


def record_group(record: dict[str, Any]) -> tuple:
    """The group of a run-store record (the same keys as a table row's :data:`GROUP_KEYS`; random
    weights are another model than the trained one)."""
    return (
        model_label(record),
        Path(record.get("data_root") or "").name,
        record.get("num_images"),
        record.get("device"),
        latency_mode(record),
        latency_precision(record),
    )


def primary_group(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the group the single-figure sections (spectral, scaling) describe: the
    most images, then the most rows; the other groups are in the tables and the CSV."""
    if not records:
        return []
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(record_group(r), []).append(r)
    key = max(groups, key=lambda k: (k[2] or 0, len(groups[k]), str(k)))
    return groups[key]


def group_title(key: tuple) -> str:
    model, dataset, images, device, *timing = key
    n = MISSING if images is None or (isinstance(images, float) and math.isnan(images)) else int(images)
    return f"{model} on {dataset} ({n} images), {device or 'unknown device'}" + mode_heading(*timing[:2])


# -- computing --------------------------------------------------------------------------------


def add_statistics(
    df: pd.DataFrame, results_dir: str | Path, resample: str = "images", n_boot: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """``df`` (one row per configuration, see :func:`bench.leaderboard.table`) with intervals,
    paired differences, McNemar p, tie marks and ranks added as columns (top-1 and agreement)."""
    check_options(resample, n_boot, seed)
    out = df.copy()
    out.attrs["statistics"] = {"resample": resample, "n_boot": n_boot, "seed": seed}
    if out.empty:
        return out
    loaded = _load_all(out, Path(results_dir))
    values: dict[Any, dict[str, Any]] = {i: {} for i in out.index}
    for _, part in out.groupby(GROUP_KEYS, sort=False, dropna=False):
        _group_statistics(part, loaded, values, resample, n_boot, seed)
    extra = pd.DataFrame.from_dict(values, orient="index").reindex(out.index)
    for col in extra.columns:
        out[col] = extra[col]
    if {"speedup_q1", "speedup_q3"} <= set(out.columns):
        out["speedup_iqr"] = [
            f"{a:.3f}–{b:.3f}" if _num(a) and _num(b) else None
            for a, b in zip(out.speedup_q1, out.speedup_q3, strict=True)
        ]
    if "top1_lo" in out:
        out["top1_ci"] = [_ci(lo, hi) for lo, hi in zip(out.top1_lo, out.top1_hi, strict=True)]
    return out


def _load_all(df: pd.DataFrame, results_dir: Path) -> dict[Any, Outcomes | None]:
    loaded: dict[Any, Outcomes | None] = {}
    column = df["outcomes_file"] if "outcomes_file" in df else pd.Series(None, index=df.index)
    for i, rel in column.items():
        if isinstance(rel, str):
            try:
                loaded[i] = load_outcomes(results_dir, rel)
            except BenchError as e:
                warnings.warn(f"{e}; its row is shown without paired statistics", stacklevel=3)
    return loaded


def _group_statistics(part, loaded, values, resample, n_boot, seed) -> None:
    base_idx = next((i for i in part.index if part.at[i, "method"] == "none"), None)
    ref = loaded.get(base_idx) if base_idx is not None else None
    if ref is None:
        ref = next((loaded[i] for i in part.index if i in loaded), None)
    usable = {i: o for i, o in loaded.items() if i in part.index and ref is not None and o.same_images(ref)}
    boot = bootstrap_for(ref.label, resample, n_boot, seed) if ref is not None else None
    for i in part.index:
        row, v = part.loc[i], values[i]
        if i not in loaded:
            v["stats_note"] = NO_OUTCOMES
        elif i not in usable:
            v["stats_note"] = OTHER_IMAGES
        for metric, attr in (("top1", "correct"), ("agreement", "agree")):
            if i == base_idx and metric == "agreement":
                continue
            iv = _single_interval(row.get(metric), row.get("images"), usable.get(i), attr, boot, resample)
            if iv is not None:
                v[f"{metric}_lo"], v[f"{metric}_hi"] = iv.low, iv.high
        if boot is not None and i in usable and base_idx in usable and i != base_idx:
            iv = boot.paired(usable[i].correct, usable[base_idx].correct).scaled(100)
            v["d_unreduced"], v["d_unreduced_lo"], v["d_unreduced_hi"] = iv.estimate, iv.low, iv.high
    if boot is None:
        return
    reduced = part[(part["method"] != "none") & part["budget"].notna()]
    for _, at_budget in reduced.groupby("budget", sort=False):
        members = [i for i in at_budget.index if i in usable]
        labels = {i: str(part.at[i, "label"]) for i in members}
        _rank(members, {i: usable[i].correct for i in members}, labels, boot, values, "top1")
        _rank(members, {i: usable[i].agree for i in members}, labels, boot, values, "agreement")


def _single_interval(value, n_images, outcomes, attr, boot, resample):
    """One row's interval in percent: Wilson when resampling images (needs only the recorded
    percentage), the class bootstrap of its per-image outcomes otherwise."""
    if resample == "images" and _num(value) and _num(n_images) and n_images > 0:
        n = int(n_images)
        return wilson_interval(round(value * n / 100), n, LEVEL).scaled(100)
    if outcomes is not None and boot is not None:
        return boot.mean(getattr(outcomes, attr)).scaled(100)
    return None


def _rank(members, x, labels, boot: Bootstrap, values, prefix: str) -> None:
    """Best = highest point estimate; rank = 1 + how many rows are significantly better (their
    paired interval excludes 0), so rows that cannot be told apart share a rank."""
    if not members:
        return
    order = sorted(members, key=lambda i: (-float(np.mean(x[i])), labels[i]))
    diff: dict[tuple, Any] = {}
    for a_pos, a in enumerate(order):
        for b in order[a_pos + 1 :]:
            iv = boot.paired(x[a], x[b])  # computed once per pair, so the two directions agree
            diff[a, b], diff[b, a] = iv, iv.negated()
    best = order[0]
    ranks = {i: 1 + sum(1 for j in order if j != i and diff[j, i].low > 0) for i in order}
    for i in order:
        v = values[i]
        v[f"{prefix}_best"] = labels[best]
        v[f"{prefix}_rank"] = ranks[i]
        v[f"{prefix}_rank_shared"] = sum(1 for r in ranks.values() if r == ranks[i]) > 1
        if i == best:
            v[f"{prefix}_d_best"] = 0.0
            v[f"{prefix}_tied"] = "best"
            continue
        iv = diff[i, best].scaled(100)
        table = discordance(x[i], x[best])
        v[f"{prefix}_d_best"], v[f"{prefix}_d_best_lo"], v[f"{prefix}_d_best_hi"] = iv.estimate, iv.low, iv.high
        v[f"{prefix}_p_best"] = table.p_value
        v[f"{prefix}_disc_best"] = table.rate
        v[f"{prefix}_tied"] = "tied" if iv.contains(0.0) else "below"


# -- rendering -------------------------------------------------------------------------------


def _num(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def _ci(lo: Any, hi: Any, signed: bool = False) -> str | None:
    if not (_num(lo) and _num(hi)):
        return None
    f = "{:+.2f}" if signed else "{:.2f}"
    return f"[{f.format(lo)}, {f.format(hi)}]"


def _with_ci(est: Any, lo: Any, hi: Any, signed: bool = False) -> str:
    if not _num(est):
        return MISSING
    ci = _ci(lo, hi, signed)
    return (f"{est:+.2f}" if signed else f"{est:.2f}") + (f" {ci}" if ci else "")


def _p(p: Any) -> str:
    if not _num(p):
        return MISSING
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _rank_text(row: pd.Series, prefix: str) -> str:
    r = row.get(f"{prefix}_rank")
    if not _num(r):
        return MISSING
    return f"{int(r)}=" if row.get(f"{prefix}_rank_shared") is True else f"{int(r)}"


def _tie_text(row: pd.Series, prefix: str) -> str:
    mark = row.get(f"{prefix}_tied")
    if isinstance(mark, str) and mark:
        return {"best": "**best**", "tied": "tied with best", "below": "below best"}[mark]
    note = row.get("stats_note")
    return note if isinstance(note, str) else ""


def describe(attrs: dict[str, Any]) -> str:
    o = attrs.get("statistics", {"resample": "images", "n_boot": 2000, "seed": 0})
    unit = "whole classes (cluster bootstrap)" if o["resample"] == "classes" else "images"
    single = "Wilson score interval" if o["resample"] == "images" else "the same class bootstrap"
    return (
        f"Resampling: **{unit}** — paired percentile bootstrap, {o['n_boot']} resamples, seed {o['seed']}; "
        f"one row's interval: {single}. 95% intervals, each for its own comparison (not adjusted for the "
        "number of rows). Δ = row − reference on the same images; McNemar p: exact two-sided, from the "
        "images on which exactly one of the two is right. Rank = 1 + the number of rows at the same budget "
        "whose paired interval lies entirely above this row's; `=` marks a shared rank."
    )


def statistics_lines(part: pd.DataFrame, attrs: dict[str, Any]) -> list[str]:
    """The statistics subsection of one group's table (rows from :func:`add_statistics`)."""
    if "top1" not in part or part["top1"].isna().all() or "top1_lo" not in part:
        return []
    lines = ["### Which differences are real", "", describe(attrs), ""]
    base = part[part["method"] == "none"]
    if not base.empty:
        b = base.iloc[0]
        lines += [f"Unreduced top-1: {_with_ci(b.get('top1'), b.get('top1_lo'), b.get('top1_hi'))} %.", ""]
    reduced = part[part["method"] != "none"]
    budgets = sorted(reduced["budget"].dropna().unique(), reverse=True)
    for budget in budgets:
        at = reduced[reduced["budget"] == budget]
        lines += _budget_table(at, f"MACs target {budget:.2f}")
    own = reduced[reduced["budget"].isna()]
    if not own.empty:
        lines += _budget_table(own, "Own knob (different MACs: compared with the unreduced model only)", ranked=False)
    lines += _detectable_lines(part)
    return lines


def _budget_table(at: pd.DataFrame, title: str, ranked: bool = True) -> list[str]:
    if "top1_rank" in at and ranked:
        at = at.assign(_r=at["top1_rank"].fillna(1e9), _t=-at["top1"].fillna(-1e9)).sort_values(["_r", "_t", "label"])
    best_top1 = next((b for b in at.get("top1_best", pd.Series(dtype=object)).dropna()), None)
    best_agree = next((b for b in at.get("agreement_best", pd.Series(dtype=object)).dropna()), None)
    head = f"**{title}**"
    if ranked and best_top1:
        head += f" — best top-1: {best_top1}; best agreement: {best_agree}"
    lines = [
        head,
        "",
        "| rank | method | knob | top-1 % [95% CI] | Δ vs unreduced | Δ vs best | p vs best | tie "
        "| agree rank | agree % [95% CI] | Δ agree vs best | p vs best | tie (agree) | speedup [IQR] |",
        "|" + "---|" * 14,
    ]
    for _, r in at.iterrows():
        speed = MISSING
        if _num(r.get("speedup")):
            speed = f"{r['speedup']:.3f}" + (f" [{r['speedup_iqr']}]" if isinstance(r.get("speedup_iqr"), str) else "")
        knob = r.get("knob") if isinstance(r.get("knob"), str) and r.get("knob") else MISSING
        cells = [
            _rank_text(r, "top1"),
            str(r["label"]),
            knob,
            _with_ci(r.get("top1"), r.get("top1_lo"), r.get("top1_hi")),
            _with_ci(r.get("d_unreduced"), r.get("d_unreduced_lo"), r.get("d_unreduced_hi"), signed=True),
            _with_ci(r.get("top1_d_best"), r.get("top1_d_best_lo"), r.get("top1_d_best_hi"), signed=True),
            _p(r.get("top1_p_best")),
            _tie_text(r, "top1"),
            _rank_text(r, "agreement"),
            _with_ci(r.get("agreement"), r.get("agreement_lo"), r.get("agreement_hi")),
            _with_ci(r.get("agreement_d_best"), r.get("agreement_d_best_lo"), r.get("agreement_d_best_hi"), True),
            _p(r.get("agreement_p_best")),
            _tie_text(r, "agreement"),
            speed,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", *_speed_overlap_lines(at)]


def speed_overlaps(at: pd.DataFrame) -> list[list[str]]:
    """Rows whose speedup interquartile ranges overlap, chained (each overlaps at least one
    other of its set), fastest set first: speedups this run cannot order."""
    if not {"speedup_q1", "speedup_q3"} <= set(at.columns):
        return []
    rows = [(r["speedup_q1"], r["speedup_q3"], r["speedup"], str(r["label"])) for _, r in at.iterrows()]
    rows = sorted((r for r in rows if _num(r[0]) and _num(r[1])), key=lambda r: (r[0], r[3]))
    sets: list[list[tuple]] = []
    for r in rows:
        if sets and r[0] <= max(x[1] for x in sets[-1]):
            sets[-1].append(r)
        else:
            sets.append([r])
    return [[x[3] for x in sorted(s, key=lambda x: -x[2])] for s in reversed(sets) if len(s) > 1]


def _speed_overlap_lines(at: pd.DataFrame) -> list[str]:
    sets = speed_overlaps(at)
    measured = at["speedup_q1"].notna().sum() if "speedup_q1" in at else 0
    if measured < 2:
        return []
    if not sets:
        return ["Speedups: no two interquartile ranges overlap at this budget.", ""]
    return [
        "Speedups whose interquartile ranges overlap (not ordered by this run): "
        + "; ".join(", ".join(s) for s in sets)
        + ".",
        "",
    ]


def _detectable_lines(part: pd.DataFrame) -> list[str]:
    if "top1_disc_best" not in part:
        return []
    rates = [v for v in part["top1_disc_best"] if _num(v) and v > 0]
    n_here = part["images"].dropna()
    if not rates or n_here.empty:
        return []
    q = statistics.median(rates)
    counts = sorted({int(n_here.max()), 500, 1300, 5000, 10000, 50000})
    lines = [
        f"How many images a difference needs, at this group's median discordance with the best method "
        f"({100 * q:.1f}% of images right for exactly one of the two): the smallest true Δ top-1 (points) a paired "
        "test finds at 5% two-sided significance.",
        "",
        "| images | Δ found half the time (interval just excludes 0) | Δ found with 80% power |",
        "|---|---|---|",
    ]
    for n in counts:
        half, full = detectable_delta(n, q, LEVEL, 0.5), detectable_delta(n, q, LEVEL, 0.8)
        mark = " (this group)" if n == int(n_here.max()) else ""
        lines.append(f"| {n}{mark} | {100 * half:.2f} | {100 * full:.2f} |")
    return lines + [""]
