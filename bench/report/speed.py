"""Speedup against model size: whether a method's savings grow with the model, per batch size.

At DeiT-Tiny's size a reducer's bookkeeping (gathers, sorts, kernel launches) weighs as much as
the tokens it saves; at DeiT-Base it should not. One panel per device, precision (fp32 or bf16
autocast) and batch size, the models on the x axis in the order of their unreduced GMACs, one
line per method, solid for eager, dashed for compiled timings and dotted with hollow markers for
inductor's C++ wrapper (timed on DeiT-Tiny only, so a lone marker): a method's colour is the same
as in every other figure.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from bench.report.latency import BF16, CPP_WRAPPER, FP32
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


def plot_speed_by_size(df: pd.DataFrame, path: Path) -> Path | None:
    """Speedup per method against model size; None unless the rows span two or more models."""
    d = df[(df["method"] != "none")]
    sizes = batch_sizes(d)
    if d["model"].nunique() < 2 or not sizes:
        return None
    models = model_order(df)
    precision = d["latency_precision"] if "latency_precision" in d else pd.Series(FP32, index=d.index)
    d = d.assign(latency_precision=precision.fillna(FP32))
    rows = sorted({(str(dev), p) for dev, p in zip(d["device"].fillna(""), d["latency_precision"], strict=True)})
    fig, axes = figure(len(sizes), 5.5 * len(sizes), 4.2 * len(rows), nrows=len(rows))
    colors, markers = label_styles(d["label"])
    for row, (device, prec) in enumerate(rows):
        here = d[(d["device"].fillna("") == device) & (d["latency_precision"] == prec)]
        for col, batch in enumerate(sizes):
            ax = axes[row * len(sizes) + col]
            where = (f"{device}, " if device else "") + ("bf16, " if prec == BF16 else "")
            column = f"speedup_b{batch}"
            if column not in here or not here[column].notna().any():  # this device never ran this batch
                ax.axis("off")
                ax.text(
                    0.5, 0.5, f"{where}batch {batch}: not measured", ha="center", fontsize=9, transform=ax.transAxes
                )
                continue
            _panel(ax, here, column, models, colors, markers)
            ax.set_title(f"{where}batch {batch}", fontsize=9)
    budgets = sorted({f"{b:.2f}" for b in d["budget"].dropna()})
    title = "Speedup vs model size" + (f" at MACs {', '.join(budgets)}" if budgets else "")
    if all(m.endswith(RANDOM_WEIGHTS) for m in models):
        title += ", random weights"
    styles = "solid: eager, dashed: compiled"
    if (d["latency_mode"] == CPP_WRAPPER).any():
        styles += ", dotted and hollow: C++ wrapper"
    return save(fig, path, f"{title} ({styles})", legend_ax=axes)


def _panel(ax, d: pd.DataFrame, column: str, models: list[str], colors: dict, markers: dict) -> None:
    x_of = {m: i for i, m in enumerate(models)}
    for (label, mode), rows in d.groupby(["label", "latency_mode"], sort=True):
        rows = rows[rows[column].notna()]
        if rows.empty:
            continue
        rows = rows.assign(x=rows["model"].map(x_of)).sort_values("x")
        compiled = mode != "eager"
        cpp = mode == CPP_WRAPPER
        ax.plot(
            rows["x"],
            rows[column],
            linestyle=":" if cpp else "--" if compiled else "-",
            marker=markers[label],
            markerfacecolor="none" if cpp else colors[label],
            color=colors[label],
            label=f"{label}, {mode}" if compiled else label,
        )
    ax.axhline(1.0, color="black", lw=1)
    ax.set_xticks(range(len(models)), [m.removesuffix(RANDOM_WEIGHTS) for m in models], fontsize=7, rotation=15)
    ax.set_ylabel(f"speedup vs unreduced (×), {column.removeprefix('speedup_')}")
    ax.grid(alpha=0.3)
