"""Spectral and scaling measurements, plugged into every job and into the leaderboard."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from omegaconf import DictConfig
from torch import nn

from bench import leaderboard
from bench.data import ImageSet
from bench.row_notes import knob_text
from methods import TokenReducer

if TYPE_CHECKING:
    from bench.cache import MeasurementCache


def spectral_job(
    cfg: DictConfig,
    model: nn.Module,
    reducer: TokenReducer,
    data: ImageSet,
    device: torch.device,
    cache: MeasurementCache | None = None,
):
    sc = cfg.bench.get("spectral")
    if not sc or not sc.enabled:
        return {}
    from bench.errors import BenchError
    from bench.spectral import spectral_metrics

    iou_keep = sc.get("iou_keep", 0.5)
    if isinstance(iou_keep, bool) or not isinstance(iou_keep, (int, float)) or not 0 < iou_keep <= 1:
        raise BenchError(f"bench.spectral.iou_keep must be in (0, 1], got {iou_keep!r}")
    if int(sc.images) < 1:
        raise BenchError(f"bench.spectral.images must be at least 1, got {sc.images}")
    images = data.images[: sc.images].to(device)
    key = (str(cfg.model), str(cfg.data), str(device))
    return spectral_metrics(model, reducer, images, sc.bands, key=key, iou_keep=float(iou_keep), cache=cache)


def scaling_job(
    cfg: DictConfig,
    model: nn.Module,
    reducer: TokenReducer,
    data: ImageSet,
    device: torch.device,
    cache: MeasurementCache | None = None,
):
    sc = cfg.bench.get("scaling")
    if not sc or not sc.enabled:
        return {}
    from bench.scaling import scaling_metrics

    lat = cfg.bench.latency
    return scaling_metrics(
        model,
        reducer,
        list(sc.resolutions),
        device,
        sc.batch_tokens,
        sc.warmup,
        sc.iters,
        lat.amp,
        lat.threads,
        sc.claim_resolution,
        cfg.progress,
        sc.get("max_seconds_per_point"),
        cache,
    )


# -- leaderboard sections -----------------------------------------------------------------------


def _having(records: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """The records (already one per configuration) that measured ``key``."""
    return [r for r in records if key in r.get("metrics", {})]


def _label(r: dict[str, Any]) -> str:
    t = r.get("budget", {}).get("macs_ratio_target")
    name = leaderboard.display_name(r)
    return f"{name} {knob_text(r)}".strip() if t is None else f"{name} @{t:.2f}"


def spectral_section(records: list[dict[str, Any]], results_dir: Path) -> list[Path]:
    """Spectral table and plots from ``records`` merged one per configuration."""
    recs = _having(records, "spectral_blocks")
    if not recs:
        return []
    from bench.plots import figure, lines_by_method, save

    rows, bands = [], []
    for r in recs:
        for b, row in enumerate(r["metrics"]["spectral_blocks"]):
            rows.append({"method": _label(r), "block": b, "hf_energy": row["hf_energy"]})
        for k, v in enumerate(r["metrics"]["spectral_band_rel"][-1]):
            bands.append({"method": _label(r), "band": k, "relative power": v})
    ref = recs[0]["metrics"]["spectral_blocks"]
    rows += [{"method": "unreduced", "block": b, "hf_energy": row["hf_energy_unreduced"]} for b, row in enumerate(ref)]
    n_images = recs[0]["metrics"]["spectral_images"]
    fig, (ax,) = figure()
    lines_by_method(ax, pd.DataFrame(rows), "block", "hf_energy")
    ax.set_ylabel("HF energy ratio ‖X − mean‖² / ‖X‖² (size-weighted)")
    energy = save(
        fig,
        results_dir / "spectral_energy.png",
        f"High-frequency energy of the patch tokens after each block ({n_images} images)",
        legend_ax=ax,
    )
    fig, (ax,) = figure()
    lines_by_method(ax, pd.DataFrame(bands), "band", "relative power")
    ax.axhline(1.0, color="black", lw=1)
    ax.set_xlabel("radial frequency band of the patch grid (0 = DC … high)")
    ax.set_ylabel("power relative to unreduced")
    ax.set_yscale("log")
    band_path = save(
        fig,
        results_dir / "spectral_bands.png",
        f"Which spatial frequencies survive to the last block ({n_images} images)",
        legend_ax=ax,
    )

    lines = [
        "",
        "## Spectral frequency bias",
        "",
        "After the last block, relative to the unreduced model on the same images. Removed/kept: mean FATR "
        "`std` score (high-frequency contribution) of the tokens each reducer merged or dropped vs those it "
        "kept as they were, averaged over its reduction blocks. Token-set metrics weight a merged token by its "
        "size; effective and stable rank are bounded by the number of tokens left, so they fall with any "
        "reduction: compare methods with each other rather than with 1.0.",
        "",
        "| method | HF energy (rel.) | effective rank (rel.) | stable rank (rel.) | removed HF score | kept HF score |",
        "|---|---|---|---|---|---|",
    ]
    for r in recs:
        m = r["metrics"]
        last = m["spectral_blocks"][-1]
        rem = [v["removed"] for v in m["spectral_removal"].values() if not math.isnan(v["removed"])]
        kept = [v["kept"] for v in m["spectral_removal"].values() if not math.isnan(v["kept"])]
        lines.append(
            f"| {_label(r)} | {last['hf_energy_rel']:.3f} | {last['effective_rank_rel']:.3f} | "
            f"{last['stable_rank_rel']:.3f} | {_avg(rem):.4f} | {_avg(kept):.4f} |"
        )
    from bench.paper_report import paper_section

    paper_lines, paper_paths = paper_section(recs, results_dir, _label)
    _append(results_dir, lines + [""] + paper_lines)
    return [energy, band_path, *paper_paths]


def _avg(v: list[float]) -> float:
    return sum(v) / len(v) if v else float("nan")


def _append(results_dir: Path, lines: list[str]) -> None:
    md = results_dir / "leaderboard.md"
    md.write_text(md.read_text() + "\n".join(lines))


def _fmt_num(v: Any, spec: str) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def scaling_section(records: list[dict[str, Any]], results_dir: Path) -> list[Path]:
    """Scaling table, plot and the high-resolution claim from merged ``records``; latencies
    the harness extrapolated (beyond the measured resolutions) are dashed and say so."""
    recs = _having(records, "scaling")
    if not recs:
        return []
    from bench.plots import figure, label_styles, lines_by_method, log_ticks, save

    rows = []

    def add(label: str, s: dict[str, Any], latency: Any, gmacs: Any) -> None:
        rows.append(
            {
                "method": label,
                "tokens": s["tokens"],
                "latency ms (batch 1)": latency,
                "GMACs": gmacs,
                "extrapolated": bool(s.get("extrapolated", False)),
            }
        )

    for r in recs:
        for s in r["metrics"]["scaling"]:
            add(_label(r), s, s["latency_ms_b1"], s["gmacs"])
    for s in recs[0]["metrics"]["scaling"]:
        add("unreduced", s, s["latency_ms_b1_unreduced"], s["gmacs_unreduced"])
    d = pd.DataFrame(rows)
    lat = "latency ms (batch 1)"
    fig, axes = figure(2, 12, 4.8)
    measured = d[~d["extrapolated"]].dropna(subset=[lat])
    lines_by_method(axes[0], measured, "tokens", lat)
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
    path = save(
        fig,
        results_dir / "scaling.png",
        f"Cost vs tokens ({min(d['tokens'])} → {max(d['tokens'])} tokens), {recs[0].get('device')}",
        legend_ax=axes[0],
    )

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
        m = r["metrics"]
        res = m["resolution_at_base_latency"]
        res_s = (
            "never: slower already at the base resolution"
            if math.isnan(res)
            else f"{res:.0f}" + (" (extrapolated)" if m["resolution_at_base_latency_extrapolated"] else "")
        )
        points = [s for s in m["scaling"] if not s.get("extrapolated", False)]
        upto = f"{points[-1]['resolution']} px" if points else "–"
        if m.get("scaling_busy"):
            upto += " (busy machine)"
        claim = _fmt_num(m["claim_latency_vs_base"], ".0f") + "×"
        claim += "" if m.get("claim_measured") else " (extrapolated)"
        lines.append(
            f"| {_label(r)} | {upto} | {_fmt_num(m['alpha_latency'], '.2f')} | "
            f"{_fmt_num(m['alpha_latency_unreduced'], '.2f')} | {_fmt_num(m['alpha_gmacs'], '.2f')} |"
            f" {_fmt_num(m['alpha_gmacs_unreduced'], '.2f')} | {res_s} | {claim} |"
        )
        how = (
            "measured"
            if m.get("claim_measured")
            else "extrapolated from the largest measured resolution at its time per GMAC"
            if "scaling_budget_s" in m
            else "power law fitted on the three largest measured resolutions"  # records before the budget
        )
        claims.append((m["claim_latency_vs_base"], _label(r), m["claim_resolution"], how))
    cached = sorted(
        {
            r["metrics"].get("scaling_unreduced_measured_at")
            for r in recs
            if r["metrics"].get("scaling_unreduced_from_cache")
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
    _append(results_dir, lines)
    return [path]
