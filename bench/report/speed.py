"""Speedup against model size: whether a method's savings grow with the model, per batch size.

At DeiT-Tiny's size a reducer's bookkeeping (gathers, sorts, kernel launches) weighs as much as
the tokens it saves; at DeiT-Base it should not. One panel per device, precision (fp32 or bf16
autocast) and batch size that was measured (nothing is drawn for the others), the models on the
x axis in the order of their unreduced GMACs, one line per method and timing mode: a method's
colour is the same as in every other figure, the mode is the line style (:data:`MODE_STYLES`;
inductor's C++ wrapper is timed on DeiT-Tiny only, so its hollow marker stands alone). The
legend names each method once and each mode once. :func:`plot_speed_grid` gives the same
numbers as one table of coloured cells, a method per row and a timing setting per column.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

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


def _with_timing_defaults(d: pd.DataFrame) -> pd.DataFrame:
    """``d`` with every row's precision (fp32 where a record predates bf16 timing) and device
    ('' where none was recorded) filled in, so that rows group by them."""
    precision = d["latency_precision"] if "latency_precision" in d else pd.Series(FP32, index=d.index)
    return d.assign(latency_precision=precision.fillna(FP32), device=d["device"].fillna(""))


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
    d = _with_timing_defaults(d)
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


MODE_ORDER = [EAGER, "compile", CPP_WRAPPER, "max-autotune", "cudagraphs"]
"""Timing modes left to right in :func:`plot_speed_grid` (another mode: after these)."""
BUSY_MARK = "*"


def _device_short(device: str) -> str:
    """``CPU AMD EPYC (2 threads)`` -> ``CPU``; ``NVIDIA H200`` -> ``H200``."""
    return "CPU" if device.startswith("CPU") else device.removeprefix("NVIDIA ").strip() or "unknown"


def _model_short(model: str) -> str:
    """``deit_small_patch16_224 (random weights)`` -> ``deit_small``."""
    return re.sub(r"_patch\d+_\d+$", "", model.removesuffix(RANDOM_WEIGHTS))


class SpeedGrid(NamedTuple):
    values: pd.DataFrame
    """Speedups, a row per method label, a column per timing setting."""
    busy: pd.DataFrame
    """Same shape: the cell was timed on a busy host."""
    columns: list[tuple]
    """Each column's ``(device, precision, batch, mode, model)``."""
    budget: float
    """The MACs budget every cell was timed at."""


def speed_grid(df: pd.DataFrame) -> SpeedGrid | None:
    """Speedups as a (method label × timing setting) table, a same-shaped table of busy flags,
    the columns' settings ``(device, precision, batch, mode, model)`` and the budget, in reading order:
    device, precision, batch and mode group the columns, the models (smallest first) sit side
    by side inside a group, so a row read across a group is the method against model size.
    None unless the rows span two or more settings of model, device, precision or mode at one
    budget (a single run is read in its leaderboard)."""
    d = df[(df["method"] != "none") & df["budget"].notna()] if "budget" in df else df.iloc[0:0]
    sizes = batch_sizes(d)
    if d.empty or not sizes or d["budget"].nunique() != 1:
        return None
    busy = d["latency_busy_reason"].notna() if "latency_busy_reason" in d else pd.Series(False, index=d.index)
    d = _with_timing_defaults(d).assign(busy=busy)
    settings = d[["device", "latency_precision", "latency_mode", "model"]].drop_duplicates()
    if len(settings) < 2:
        return None
    models = {m: i for i, m in enumerate(model_order(df))}
    modes = {m: i for i, m in enumerate(MODE_ORDER)}
    columns: dict[tuple, dict[str, float]] = {}
    flags: dict[tuple, dict[str, bool]] = {}
    if "timestamp" in d:  # one cell per label and setting: the latest timing wins (other images, another run)
        d = d.sort_values("timestamp", kind="stable", na_position="first")
    for _, r in d.iterrows():
        for batch in sizes:
            value = r.get(f"speedup_b{batch}")
            if value is None or value != value:
                continue
            key = (r["device"], r["latency_precision"], batch, r["latency_mode"], r["model"])
            columns.setdefault(key, {})[r["label"]] = float(value)
            flags.setdefault(key, {})[r["label"]] = bool(r["busy"])
    order = sorted(
        columns,
        key=lambda k: (
            not k[0].startswith("CPU"),
            k[0],
            k[1] != FP32,
            k[2],
            modes.get(k[3], len(modes)),
            k[3],
            models.get(k[4], len(models)),
        ),
    )
    values = pd.DataFrame({k: columns[k] for k in order})
    busy_flags = pd.DataFrame({k: flags[k] for k in order}).reindex_like(values).fillna(False).astype(bool)
    ranked = values.median(axis=1).sort_values(ascending=False, kind="stable").index
    return SpeedGrid(values.loc[ranked], busy_flags.loc[ranked], order, float(d["budget"].iloc[0]))


def plot_speed_grid(df: pd.DataFrame, path: Path) -> Path | None:
    """Every method's speedup in every timing setting, one cell each, coloured around 1.0
    (red: slower than unreduced), the number written in; the speed table at a glance. None
    where :func:`speed_grid` is."""
    from matplotlib.colors import TwoSlopeNorm

    grid = speed_grid(df)
    if grid is None:
        return None
    values, busy, order, budget = grid
    ncols, nrows = values.shape[1], values.shape[0]
    fig, axes = figure(1, 2.4 + 0.62 * ncols, 1.9 + 0.3 * nrows)
    ax = axes[0]
    data = values.to_numpy(float)
    low, high = np.nanmin(data), np.nanmax(data)
    norm = TwoSlopeNorm(vcenter=1.0, vmin=min(low, 0.5), vmax=max(high, 1.5))
    ax.imshow(np.ma.masked_invalid(data), cmap="RdBu", norm=norm, aspect="auto")
    for i in range(nrows):
        for j in range(ncols):
            v = data[i, j]
            if v != v:
                continue
            text = f"{v:.2f}" + (BUSY_MARK if busy.iat[i, j] else "")
            dark = abs(norm(v) - 0.5) > 0.3
            ax.text(j, i, text, ha="center", va="center", fontsize=6.5, color="white" if dark else "black")
    ax.set_yticks(range(nrows), list(values.index), fontsize=8)
    labels = [
        f"{_model_short(model)}\n{_device_short(device)} {prec}\nbatch {batch}\n{mode}"
        for device, prec, batch, mode, model in order
    ]
    ax.set_xticks(range(ncols), labels, fontsize=6.5)
    ax.tick_params(length=0)
    for j in range(1, ncols):  # a white rule where device, precision, batch or mode changes
        if order[j][:4] != order[j - 1][:4]:
            ax.axvline(j - 0.5, color="white", lw=3)
    ax.set_facecolor("#eeeeee")  # not measured
    title = f"Speedup vs unreduced at MACs {budget:.2f}, every method and timing setting (red: slower)"
    title += "\nmeasured on " + "; ".join(dict.fromkeys(device or "an unknown device" for device, *_ in order))
    if busy.to_numpy().any():
        title += f"\n{BUSY_MARK}: timed on a busy host (see the leaderboard's notes)"
    return save(fig, path, title)
