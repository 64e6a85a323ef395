"""Speedup against model size: whether a method's savings grow with the model, per batch size.

At DeiT-Tiny's size a reducer's bookkeeping (gathers, sorts, kernel launches) weighs as much as
the tokens it saves; at DeiT-Base it should not. One panel per device, precision (fp32 or bf16
autocast) and batch size that was measured (nothing is drawn for the others), the models on the
x axis in the order of their unreduced GMACs, one line per method and timing mode: a method's
colour is the same as in every other figure, the mode is the line style (:data:`MODE_STYLES`;
inductor's C++ wrapper is timed on DeiT-Tiny only, so its hollow marker stands alone). The
legend names each method once and each mode once.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from bench.report.latency import BF16, CPP_WRAPPER, EAGER, FP32
from bench.report.style import figure, label_styles, save

BATCH_COLUMN = re.compile(r"^speedup_b(\d+)$")
RANDOM_WEIGHTS = " (random weights)"


def batch_sizes(df: pd.DataFrame) -> list[int]:
    """The latency batch sizes with at least one measured speedup, smallest first."""
    found = [int(m[1]) for c in df.columns if (m := BATCH_COLUMN.match(c)) and df[c].notna().any()]
    return sorted(found)


def model_order(df: pd.DataFrame) -> list[str]:
    """Models by their unreduced GMACs (the ``none`` rows; else their smallest row)."""
    plain = df[df["method"] == "none"] if (df["method"] == "none").any() else df
    size = plain.groupby("model")["gmacs"].min() if "gmacs" in plain else pd.Series(dtype=float)
    return sorted(df["model"].unique(), key=lambda m: (size.get(m, np.inf), m))


MODE_STYLES: dict[str, tuple[object, str]] = {
    EAGER: ("-", "eager"),
    "compile": ("--", "compiled (inductor)"),
    "max-autotune": ((0, (5, 2, 1, 2, 1, 2)), "compiled (max-autotune)"),
    CPP_WRAPPER: (":", "compiled (C++ wrapper), hollow"),
    "cudagraphs": ((0, (4, 1.5, 1, 1.5)), "CUDA graphs"),
}
"""Line style and legend text of each ``bench.latency.compile`` mode (another mode: dashed)."""

PANEL_COLUMNS = 3


def _mode_style(mode: str) -> tuple[object, str]:
    return MODE_STYLES.get(mode, ("--", f"compiled ({mode})"))


def plot_speed_by_size(df: pd.DataFrame, path: Path) -> Path | None:
    """Speedup per method against model size; None unless the rows span two or more models."""
    from matplotlib.lines import Line2D

    d = df[(df["method"] != "none")]
    sizes = batch_sizes(d)
    if d["model"].nunique() < 2 or not sizes:
        return None
    models = model_order(df)
    precision = d["latency_precision"] if "latency_precision" in d else pd.Series(FP32, index=d.index)
    d = d.assign(latency_precision=precision.fillna(FP32), device=d["device"].fillna(""))
    panels = []  # (device, precision, batch) that was measured, device by device
    for device, prec in sorted({(str(dev), p) for dev, p in zip(d["device"], d["latency_precision"], strict=True)}):
        here = d[(d["device"] == device) & (d["latency_precision"] == prec)]
        for batch in sizes:
            column = f"speedup_b{batch}"
            if column in here and here[column].notna().any():
                panels.append((device, prec, batch, here))
    ncols = min(PANEL_COLUMNS, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = figure(ncols, 5.5 * ncols, 4.2 * nrows, nrows=nrows)
    colors, markers = label_styles(d["label"])
    for ax, (device, prec, batch, here) in zip(axes, panels, strict=False):
        _panel(ax, here, f"speedup_b{batch}", models, colors, markers)
        where = f"{device}, " if device else ""
        ax.set_title(f"{where}{'bf16 autocast' if prec == BF16 else 'fp32'}, batch {batch}", fontsize=9)
    for ax in axes[len(panels) :]:
        ax.axis("off")
    budgets = sorted({f"{b:.2f}" for b in d["budget"].dropna()})
    title = "Speedup vs model size" + (f" at MACs {', '.join(budgets)}" if budgets else "")
    if all(m.endswith(RANDOM_WEIGHTS) for m in models):
        title += ", random weights"
    legend = [(Line2D([], [], color=colors[lb], marker=markers[lb]), lb) for lb in sorted(colors)]
    legend.append((Line2D([], [], linestyle="none"), "line style: timing"))
    for mode in sorted(d["latency_mode"].dropna().unique(), key=lambda m: (m != EAGER, m)):
        style, text = _mode_style(mode)
        # a line alone: a marker in the middle of the short sample hid all but one dash of a
        # dash-dot, and CUDA graphs looked like eager; only the hollow marker means something
        marker = {"marker": "o", "mfc": "none"} if mode == CPP_WRAPPER else {}
        legend.append((Line2D([], [], color="black", linestyle=style, **marker), text))
    return save(fig, path, title, legend=legend)


def _panel(ax, d: pd.DataFrame, column: str, models: list[str], colors: dict, markers: dict) -> None:
    x_of = {m: i for i, m in enumerate(models)}
    for (label, mode), rows in d.groupby(["label", "latency_mode"], sort=True):
        rows = rows[rows[column].notna()]
        if rows.empty:
            continue
        rows = rows.assign(x=rows["model"].map(x_of)).sort_values("x")
        hollow = mode == CPP_WRAPPER
        ax.plot(
            rows["x"],
            rows[column],
            linestyle=_mode_style(mode)[0],
            marker=markers[label],
            markerfacecolor="none" if hollow else colors[label],
            color=colors[label],
        )
    ax.axhline(1.0, color="black", lw=1)
    ax.set_xticks(range(len(models)), [m.removesuffix(RANDOM_WEIGHTS) for m in models], fontsize=7, rotation=15)
    ax.set_ylabel(f"speedup vs unreduced (×), {column.removeprefix('speedup_')}")
    ax.grid(alpha=0.3)
