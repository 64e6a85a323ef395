"""Leaderboard section: each method's variants against that method's default configuration.

A variant (a non-default hyper-parameter, e.g. ``fatr (score=svd)``) is best judged against its
own method's default at the same budget, on the same images: a paired interval for Δ top-1 and
Δ agreement and the exact McNemar p. This is how the FATR fidelity variants (paper default vs
the earlier defaults, one change at a time, the seed's SVD score) are compared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.measure.outcomes import Outcomes, load_outcomes
from bench.report.significance import record_group
from bench.report.stats import bootstrap_for, discordance


def _budget(record: dict[str, Any]) -> float | None:
    return (record.get("budget") or {}).get("macs_ratio_target")


def _outcomes(record: dict[str, Any], results_dir: Path) -> Outcomes | None:
    path = (record.get("metrics") or {}).get("outcomes_file")
    if not path:
        return None
    try:
        return load_outcomes(results_dir, path)
    except BenchError:
        return None


def variant_rows(
    records: list[dict[str, Any]], results_dir: Path, resample: str = "images", n_boot: int = 2000, seed: int = 0
) -> list[dict[str, Any]]:
    """One row per (variant, its method's default) pair at the same budget and in one group."""
    rows = []
    by_key: dict[tuple, dict[str, Any]] = {}
    for r in records:
        if r.get("method") and not r.get("variant") and _budget(r) is not None:
            by_key[(record_group(r), r["method"], _budget(r))] = r
    for r in records:
        if not r.get("variant") or _budget(r) is None:
            continue
        ref = by_key.get((record_group(r), r.get("method"), _budget(r)))
        if ref is None:
            continue
        oa, ob = _outcomes(r, results_dir), _outcomes(ref, results_dir)
        row: dict[str, Any] = {
            "method": r["method"],
            "variant": r["variant"],
            "budget": _budget(r),
            "top1": r["metrics"].get("top1"),
            "reference_top1": ref["metrics"].get("top1"),
        }
        if oa is not None and ob is not None and oa.same_images(ob):
            boot = bootstrap_for(oa.label, resample, n_boot, seed)
            for name, xa, xb in (("top1", oa.correct, ob.correct), ("agreement", oa.agree, ob.agree)):
                iv = boot.paired(xa, xb).scaled(100)
                row[f"d_{name}"] = iv
                row[f"p_{name}"] = discordance(xa, xb).p_value
        rows.append(row)
    return sorted(rows, key=lambda x: (x["method"], -x["budget"], x["variant"]))


def variants_section(
    records: list[dict[str, Any]], results_dir: Path, resample: str = "images", n_boot: int = 2000, seed: int = 0
) -> list[str]:
    """Markdown lines of the section (empty when no method has a variant next to its default)."""
    rows = variant_rows(records, results_dir, resample, n_boot, seed)
    if not rows:
        return []
    unit = "whole classes" if resample == "classes" else "images"
    lines = [
        "",
        "## Variants against their method's default",
        "",
        f"Paired over the same images (bootstrap over {unit}, {n_boot} resamples, seed {seed}; exact McNemar p). "
        "Δ = variant − default at the same MACs target; an interval that includes 0 means the two cannot be told "
        "apart on these images.",
        "",
        "| method | variant | MACs target | top-1 % | default top-1 % | Δ top-1 [95%] | p | Δ agree [95%] | p |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [row["method"], row["variant"], f"{row['budget']:.2f}", _pct(row["top1"]), _pct(row["reference_top1"])]
        for name in ("top1", "agreement"):
            iv = row.get(f"d_{name}")
            if iv is None:
                cells += ["– (no per-image outcomes)", "–"]
            else:
                mark = " (tie)" if iv.contains(0.0) else ""
                cells += [f"{iv.estimate:+.2f} [{iv.low:+.2f}, {iv.high:+.2f}]{mark}", f"{row[f'p_{name}']:.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _pct(v: Any) -> str:
    return "–" if v is None else f"{v:.2f}"
