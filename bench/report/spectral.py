"""The leaderboard's spectral section: how much high-frequency content each method keeps after
the last block, as a table and two plots, from the records :mod:`bench.measure.spectral` writes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, cast

import pandas as pd

from bench.measure.spectral import SpectralMetrics
from bench.report.labels import method_label
from bench.results_io import append_markdown


def spectral_section(records: list[dict[str, Any]], results_dir: Path) -> list[Path]:
    """Spectral table and plots from ``records`` merged one per configuration."""
    recs = [r for r in records if "spectral_blocks" in r.get("metrics", {})]
    if not recs:
        return []
    from bench.report.style import figure, lines_by_method, save

    rows, bands = [], []
    for r in recs:
        for b, row in enumerate(_spectral(r)["spectral_blocks"]):
            rows.append({"method": method_label(r), "block": b, "hf_energy": row["hf_energy"]})
        for k, v in enumerate(_spectral(r)["spectral_band_rel"][-1]):
            bands.append({"method": method_label(r), "band": k, "relative power": v})
    ref = _spectral(recs[0])["spectral_blocks"]
    rows += [{"method": "unreduced", "block": b, "hf_energy": row["hf_energy_unreduced"]} for b, row in enumerate(ref)]
    n_images = _spectral(recs[0])["spectral_images"]
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
        m = _spectral(r)
        last = m["spectral_blocks"][-1]
        rem = [v["removed"] for v in m["spectral_removal"].values() if not math.isnan(v["removed"])]
        kept = [v["kept"] for v in m["spectral_removal"].values() if not math.isnan(v["kept"])]
        lines.append(
            f"| {method_label(r)} | {last['hf_energy_rel']:.3f} | {last['effective_rank_rel']:.3f} | "
            f"{last['stable_rank_rel']:.3f} | {_avg(rem):.4f} | {_avg(kept):.4f} |"
        )
    from bench.report.paper import paper_section

    paper_lines, paper_paths = paper_section(recs, results_dir, method_label)
    append_markdown(results_dir, lines + [""] + paper_lines)
    return [energy, band_path, *paper_paths]


def _spectral(record: dict[str, Any]) -> SpectralMetrics:
    """A record's spectral metrics, in the shape :mod:`bench.measure.spectral` declares."""
    return cast(SpectralMetrics, record["metrics"])


def _avg(v: list[float]) -> float:
    return sum(v) / len(v) if v else float("nan")
