"""The leaderboard's high-resolution scaling section: each method's cost against its tokens, as a
table, a plot and the 4K claim, from the records :mod:`bench.measure.scaling` writes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, cast

import pandas as pd

from bench.measure.scaling import ScalingMetrics, ScalingPoint
from bench.report.labels import method_label
from bench.results_io import append_markdown


def _scaling(record: dict[str, Any]) -> ScalingMetrics:
    """A record's scaling metrics, in the shape :mod:`bench.measure.scaling` declares."""
    return cast(ScalingMetrics, record["metrics"])


def _fmt_num(v: Any, spec: str) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def mark_busy(ax, measured: pd.DataFrame, x: str, y: str) -> None:
    """Hollow markers over the measured points timed on a busy machine, and one legend entry: a
    40x outlier (1206 ms where the same sweep measured 31-34 ms) must not read as a measurement
    like the others. ``measured`` is the frame the lines were drawn from (same colours, markers)."""
    from bench.report.style import label_styles

    busy = measured[measured["busy"]]
    if busy.empty:
        return
    colors, markers = label_styles(measured["method"])
    for label, part in busy.groupby("method", sort=False):
        ax.plot(part[x], part[y], ls="none", marker=markers[label], ms=7, mfc="white", mec=colors[label], zorder=5)
    ax.plot([], [], ls="none", marker="o", ms=7, mfc="white", mec="grey", label="busy machine")


def busy_lines(recs: list[dict[str, Any]]) -> list[str]:
    """Under the table, the measured points timed on a busy machine, by method (the unreduced
    model's from the first record, as plotted); records from before per-point flags have none."""
    found = [(method_label(r), _scaling(r)["scaling"], "busy", "latency_ms_b1") for r in recs]
    found.append(("unreduced", _scaling(recs[0])["scaling"], "busy_unreduced", "latency_ms_b1_unreduced"))
    items = []
    for label, points, flag, latency in found:
        busy = [f"{p['resolution']} px ({_fmt_num(p.get(latency), '.1f')} ms)" for p in points if p.get(flag)]
        if busy:
            items.append(f"- {label}: {', '.join(busy)}")
    if not items:
        return []
    title = "**Scaling points timed on a busy machine (hollow markers in scaling.png; latency less certain):**"
    return ["", title, *items]


def scaling_section(records: list[dict[str, Any]], results_dir: Path) -> list[Path]:
    """Scaling table, plot and the high-resolution claim from merged ``records``; latencies
    the harness extrapolated (beyond the measured resolutions) are dashed and say so."""
    recs = [r for r in records if "scaling" in r.get("metrics", {})]
    if not recs:
        return []
    path = plot_scaling(scaling_points(recs), recs, results_dir)
    append_markdown(results_dir, scaling_table(recs))
    return [path]


LATENCY_B1 = "latency ms (batch 1)"


def scaling_points(recs: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per method (and the unreduced model, from the first record) and resolution:
    tokens, batch-1 latency, GMACs, and whether the latency was extrapolated or timed busy."""
    rows = []

    def add(label: str, s: ScalingPoint, latency: Any, gmacs: Any, busy: Any) -> None:
        rows.append(
            {
                "method": label,
                "tokens": s["tokens"],
                LATENCY_B1: latency,
                "GMACs": gmacs,
                "extrapolated": bool(s.get("extrapolated", False)),
                "busy": bool(busy),
            }
        )

    for r in recs:
        for s in _scaling(r)["scaling"]:
            add(method_label(r), s, s["latency_ms_b1"], s["gmacs"], s.get("busy"))
    for s in _scaling(recs[0])["scaling"]:
        add("unreduced", s, s["latency_ms_b1_unreduced"], s["gmacs_unreduced"], s.get("busy_unreduced"))
    return pd.DataFrame(rows)


def plot_scaling(d: pd.DataFrame, recs: list[dict[str, Any]], results_dir: Path) -> Path:
    """``scaling.png``: latency and GMACs against tokens, log-log; extrapolated latencies dashed
    from the last measured point on, busy ones hollow."""
    from bench.report.style import figure, label_styles, lines_by_method, log_ticks, save

    lat = LATENCY_B1
    fig, axes = figure(2, 12, 4.8)
    measured = d[~d["extrapolated"]].dropna(subset=[lat])
    lines_by_method(axes[0], measured, "tokens", lat)
    mark_busy(axes[0], measured, "tokens", lat)
    colors, _ = label_styles(d["method"])
    for label, part in d.dropna(subset=[lat]).groupby("method", sort=False):
        known = part[~part["extrapolated"]]
        guess = part[part["extrapolated"]]
        if guess.empty or known.empty:
            continue
        line = pd.concat([known.tail(1), guess])  # from the last measured point on
        axes[0].plot(line["tokens"], line[lat], ls="--", lw=1.2, color=colors[label], marker="o", mfc="none", ms=5)
    if d["extrapolated"].any():
        axes[0].plot([], [], ls="--", color="grey", marker="o", mfc="none", label="extrapolated (not measured)")
    lines_by_method(axes[1], d.dropna(subset=["GMACs"]), "tokens", "GMACs")
    axes[1].set_ylabel("GMACs (analytic count)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        log_ticks(ax, d["tokens"])
        ax.tick_params(axis="x", labelrotation=45)
    return save(
        fig,
        results_dir / "scaling.png",
        f"Cost vs tokens ({min(d['tokens'])} → {max(d['tokens'])} tokens), {recs[0].get('device')}",
        legend_ax=axes[0],
    )


def scaling_table(recs: list[dict[str, Any]]) -> list[str]:
    """The leaderboard's "High-resolution scaling" section: per method the fitted exponents,
    the resolution at the base latency, the latency at the claim's resolution, and the verdict
    on the claim from the best of them."""
    lines = [
        "",
        "## High-resolution scaling",
        "",
        "Same schedule at every resolution (ToMe keeps its per-block r). Tokens and GMACs from the analytic count "
        "at every resolution; batch-1 latency measured up to the resolution in the table (where one measurement "
        "fits the per-point time budget) and beyond it extrapolated at that point's time per GMAC (dashed in "
        "scaling.png). α: exponent of cost ∝ tokensᵅ fitted over the measured resolutions. 'Res. at base "
        "latency': the resolution at which the method is as slow (batch 1) as the unreduced model at the "
        "smallest resolution.",
        "",
        "| method | latency measured up to | α latency | α latency (unreduced) | α GMACs | α GMACs (unreduced) |"
        " res. at base latency | latency at claim res. / base |",
        "|---|---|---|---|---|---|---|---|",
    ]
    claims = []
    for r in recs:
        m = _scaling(r)
        res = m.get("resolution_at_base_latency")
        res_s = (
            "–"
            if res is None
            else "never: slower already at the base resolution"
            if math.isnan(res)
            else f"{res:.0f}" + (" (extrapolated)" if m.get("resolution_at_base_latency_extrapolated") else "")
        )
        points = [s for s in m["scaling"] if not s.get("extrapolated", False)]
        upto = f"{points[-1]['resolution']} px" if points else "–"
        if m.get("scaling_busy"):
            upto += " (busy machine)"
        claim = _fmt_num(m["claim_latency_vs_base"], ".0f") + "×"
        claim += "" if m.get("claim_measured") else " (extrapolated)"
        lines.append(
            f"| {method_label(r)} | {upto} | {_fmt_num(m.get('alpha_latency'), '.2f')} | "
            f"{_fmt_num(m.get('alpha_latency_unreduced'), '.2f')} | {_fmt_num(m.get('alpha_gmacs'), '.2f')} |"
            f" {_fmt_num(m.get('alpha_gmacs_unreduced'), '.2f')} | {res_s} | {claim} |"
        )
        how = (
            "measured"
            if m.get("claim_measured")
            else "extrapolated from the largest measured resolution at its time per GMAC"
            if "scaling_budget_s" in m
            else "power law fitted on the three largest measured resolutions"  # records before the budget
        )
        claims.append((m["claim_latency_vs_base"], method_label(r), m["claim_resolution"], how))
    lines += busy_lines(recs)
    cached = sorted(
        {
            _scaling(r).get("scaling_unreduced_measured_at")
            for r in recs
            if _scaling(r).get("scaling_unreduced_from_cache")
        }
    )
    if cached:
        lines += [
            "",
            f"The unreduced model's scaling latencies come from the measurement cache (measured {', '.join(cached)}).",
        ]
    best = min((c for c in claims if not math.isnan(c[0])), default=None)
    if best is not None:
        verdict = "holds" if best[0] <= 1.0 else "does not hold"
        how = best[3] if best[3] == "measured" else best[3] + "; an extrapolation, not a measurement"
        lines += [
            "",
            f"**The claim that a reducer runs {best[2]}×{best[2]} images at the unreduced model's base-resolution "
            f"latency {verdict} in these measurements**: the best method here ({best[1]}) takes "
            f"{best[0]:.0f}× the base latency at {best[2]}² ({how}).",
        ]
    lines.append("")
    return lines
