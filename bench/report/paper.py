"""The FATR paper's frequency analysis in the leaderboard: three figures and one table.

Figures in the style of the paper's Figures 1, 4 and 6: one line per method across depth and
the unreduced model (same weights, same images) as a black dashed reference. The table gives
the paper's number, Δ log amplitude at π after the last block, with 95% intervals that pair
images (every method is measured on the same first N evaluation images), so an ordering is
only read where its interval excludes 0.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pandas as pd

from bench.measure.spectral import SpectralMetrics

Z95 = 1.959964
"""Normal 95% quantile; the intervals are over images (64 by default), where it is close to t."""

REF_STYLE = {"color": "black", "ls": "--", "marker": "*", "markersize": 9, "lw": 1.5}


def _checkpoint(r: dict[str, Any]) -> str:
    model = r.get("config", {}).get("model", {})
    if model.get("pretrained"):
        return "timm hub"
    ckpt = model.get("checkpoint")
    return Path(ckpt).stem if ckpt else "no weights"


def _paper(record: dict[str, Any]) -> SpectralMetrics:
    """A record's metrics in the shape :mod:`bench.measure.spectral` declares: the paper's keys
    are its optional ones, present once ``fourier_dlog_pi_last_images`` is (checked by the caller)."""
    return cast(SpectralMetrics, record["metrics"])


def _group(r: dict[str, Any]) -> tuple:
    """Records that share an unreduced reference and whose per-image values pair up: same
    model, weights and images (the spectral images are the first N of the evaluation set,
    which ``data.limit`` spreads over the folder, so the evaluation set's size counts too)."""
    m = _paper(r)
    return (
        r.get("model"),
        _checkpoint(r),
        r.get("data_root"),
        r.get("num_images"),
        m.get("spectral_images"),
        m.get("selection_iou_keep"),
    )


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and 95% half-width (normal approximation) of per-image values; NaN when undefined."""
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return math.nan, math.nan
    m = sum(v) / len(v)
    if len(v) < 2:
        return m, math.nan
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
    return m, Z95 * sd / math.sqrt(len(v))


def paired_ci(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of ``a − b`` image by image, with its 95% half-width; NaN if the images differ."""
    if len(a) != len(b) or not a:
        return math.nan, math.nan
    return mean_ci([x - y for x, y in zip(a, b, strict=True)])


def _fmt(m: float, h: float, signed: bool = False) -> str:
    if math.isnan(m):
        return "–"
    s = f"{m:+.3f}" if signed else f"{m:.3f}"
    return s if math.isnan(h) else f"{s} ± {h:.3f}"


def _plotted(recs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """The records at the most common MACs target (a Pareto sweep would otherwise draw dozens
    of lines), and how to say so in a title."""
    targets = Counter(r.get("budget", {}).get("macs_ratio_target") for r in recs)
    target = max(targets, key=lambda t: (targets[t], -1 if t is None else t))
    chosen = [r for r in recs if r.get("budget", {}).get("macs_ratio_target") == target]
    return chosen, ("methods at their own knobs" if target is None else f"MACs target {target:.2f}")


def paper_section(
    records: list[dict[str, Any]], results_dir: Path, label: Callable[[dict[str, Any]], str]
) -> tuple[list[str], list[Path]]:
    """Markdown lines and figures of the paper's analysis for every record that measured it.

    Args:
        records: merged run records, one per configuration.
        results_dir: where the figures go.
        label: ``record -> str``, the method label the rest of the leaderboard uses.
    """
    recs = [r for r in records if "fourier_dlog_pi_last_images" in r.get("metrics", {})]
    if not recs:
        return [], []
    # Say what differs between records (weights, evaluation set) wherever anything does.
    tags = [
        f
        for f in (_checkpoint, lambda r: f"{r.get('num_images')} images, {Path(str(r.get('data_root'))).name}")
        if len({f(r) for r in recs}) > 1
    ]

    def suffix(r: dict[str, Any]) -> str:
        return f" [{'; '.join(f(r) for f in tags)}]" if tags else ""

    def name(r: dict[str, Any]) -> str:
        return label(r) + suffix(r)

    def ref_name(r: dict[str, Any]) -> str:
        return "unreduced" + suffix(r)

    shown, what = _plotted(recs)
    paths = _figures(shown, results_dir, name, ref_name, what)
    return _table(recs, name, ref_name), paths


def _references(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per reference group (its ``*_unreduced`` values describe the group)."""
    seen: dict[tuple, dict[str, Any]] = {}
    for r in recs:
        seen.setdefault(_group(r), r)
    return list(seen.values())


def _figures(recs, results_dir: Path, name, ref_name, what: str) -> list[Path]:
    from bench.report.style import figure, lines_by_method, save

    n_images = max(_paper(r)["spectral_images"] for r in recs)
    refs = _references(recs)

    # Figure 1 of the paper: (a) Δ log amplitude vs frequency at the last block, (b) at π vs depth.
    profile, depth = [], []
    for r in recs:
        m = _paper(r)
        for f, v in zip(m["fourier_freq_pi"], m["fourier_profile"][-1], strict=True):
            profile.append({"method": name(r), "frequency (π)": f, "Δ log amplitude": v})
        for b, row in enumerate(m["spectral_blocks"]):
            depth.append({"method": name(r), "block": b, "Δ log amplitude at π": row["fourier_dlog_pi"]})
    fig, (ax_f, ax_d) = figure(2, 12, 4.8)
    lines_by_method(ax_f, pd.DataFrame(profile), "frequency (π)", "Δ log amplitude")
    lines_by_method(ax_d, pd.DataFrame(depth), "block", "Δ log amplitude at π")
    for r in refs:
        m = _paper(r)
        ax_f.plot(m["fourier_freq_pi"], m["fourier_profile_unreduced"][-1], label=ref_name(r), **REF_STYLE)
        ys = [row["fourier_dlog_pi_unreduced"] for row in m["spectral_blocks"]]
        ax_d.plot(range(len(ys)), ys, label=ref_name(r), **REF_STYLE)
    ax_f.set_title("(a) after the last block", fontsize=9)
    ax_f.set_xlabel("frequency along the diagonal (× π)")
    ax_d.set_title("(b) highest frequency (π) per block", fontsize=9)
    ax_d.set_xlabel("block (0-based)")
    fourier = save(
        fig,
        results_dir / "fourier_dlog.png",
        f"Relative log amplitude of the feature maps' Fourier spectrum (Park & Kim), {what}, {n_images} images",
        legend_ax=ax_d,
    )

    # Over-smoothing: cosine similarity of the tokens to their mean (the DC signal).
    rows = [
        {"method": name(r), "block": b, "cos": row["cos_to_mean"]}
        for r in recs
        for b, row in enumerate(_paper(r)["spectral_blocks"])
    ]
    fig, (ax,) = figure()
    lines_by_method(ax, pd.DataFrame(rows), "block", "cos")
    for r in refs:
        ys = [row["cos_to_mean_unreduced"] for row in _paper(r)["spectral_blocks"]]
        ax.plot(range(len(ys)), ys, label=ref_name(r), **REF_STYLE)
    ax.set_xlabel("block (0-based)")
    ax.set_ylabel("cosine similarity to the mean token (size-weighted)")
    smooth = save(
        fig,
        results_dir / "oversmoothing.png",
        f"Over-smoothing: similarity of the patch tokens to their DC signal, {what}, {n_images} images",
        legend_ax=ax,
    )

    # Figure 6c: overlap of EViT's kept set with FATR's HF set, at each reduction block.
    rows = [
        {"method": name(r), "block": int(b), "IoU": v}
        for r in recs
        for b, v in _paper(r)["selection_iou"].items()
        if not math.isnan(v)
    ]
    fig, (ax,) = figure()
    if rows:
        lines_by_method(ax, pd.DataFrame(rows), "block", "IoU")
    for r in refs:
        ys = _paper(r)["selection_iou_unreduced"]
        ax.plot(range(len(ys)), ys, label=ref_name(r), **REF_STYLE)
    keep = _paper(recs[0])["selection_iou_keep"]
    # Two independent random sets of a fraction q of the tokens overlap by about q / (2 − q).
    ax.axhline(keep / (2 - keep), color="gray", ls=":", lw=1.2, label="≈ chance (random sets)")
    ax.set_xlabel("block (0-based): each method at its own reduction blocks")
    ax.set_ylabel("IoU(EViT's kept set, FATR's HF set)")
    ax.set_ylim(0, 1)
    iou = save(
        fig,
        results_dir / "selection_iou.png",
        f"Do EViT and FATR pick the same tokens? Top {keep:.0%} by class attention vs by HF score,\n"
        f"same block, same attention; {what}, {n_images} images",
        legend_ax=ax,
    )
    return [fourier, smooth, iou]


def _table(recs, name, ref_name) -> list[str]:
    lines = [
        "",
        "### The paper's frequency analysis",
        "",
        "Park & Kim's relative log amplitude, as the FATR paper plots it (Figures 1, 3, 6): the tokens after a "
        "block painted back onto the patch grid, 2-D FFT per channel, log amplitude averaged over channels and "
        "images, read along the diagonal; Δ log amplitude at π is the highest frequency minus the zero "
        "frequency (higher = more high-frequency content kept). After the last block; ± is a 95% interval over "
        "images, and differences pair the same images (an ordering holds only where its interval excludes 0). "
        "Cos to mean: size-weighted cosine similarity of the patch tokens to their mean token (1 = fully "
        "over-smoothed). IoU: overlap of the tokens EViT would keep with those FATR calls high-frequency, "
        "same block, same attention, at the last block where the method reduces.",
        "",
        "| method | Δ log amp. at π | − unreduced | − fatr | cos to mean | IoU of EViT and FATR sets |",
        "|---|---|---|---|---|---|",
    ]
    for ref in _references(recs):
        m = _paper(ref)
        lines.append(
            f"| {ref_name(ref)} | {_fmt(*mean_ci(m['fourier_dlog_pi_last_unreduced_images']))} | – | – | "
            f"{m['cos_to_mean_last_unreduced']:.3f} | – |"
        )
    fatr = {}
    for r in recs:
        if r.get("method") == "fatr":
            key = (_group(r), r.get("budget", {}).get("macs_ratio_target"))
            if key not in fatr or not r.get("variant"):
                fatr[key] = r
    for r in sorted(recs, key=lambda r: -_paper(r)["fourier_dlog_pi_last"]):
        m = _paper(r)
        own = m["fourier_dlog_pi_last_images"]
        vs_ref = paired_ci(own, m["fourier_dlog_pi_last_unreduced_images"])
        other = fatr.get((_group(r), r.get("budget", {}).get("macs_ratio_target")))
        vs_fatr = (
            paired_ci(own, _paper(other)["fourier_dlog_pi_last_images"])
            if other is not None and other is not r
            else (math.nan, math.nan)
        )
        iou = {int(b): v for b, v in m["selection_iou"].items()}
        last_iou = "–"
        if iou:
            b = max(iou)
            last_iou = f"{iou[b]:.3f} (block {b}; unreduced {m['selection_iou_unreduced'][b]:.3f})"
        lines.append(
            f"| {name(r)} | {_fmt(*mean_ci(own))} | {_fmt(*vs_ref, signed=True)} | {_fmt(*vs_fatr, signed=True)} | "
            f"{m['cos_to_mean_last']:.3f} | {last_iou} |"
        )
    return lines + [""]
