"""The leaderboard's accuracy and latency figures: one panel per group (model, data set,
image count, device), so rows from another machine or another image count never share a line,
with the intervals of :mod:`bench.report.significance` drawn on every point."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from bench.report.significance import GROUP_KEYS, group_title
from bench.report.style import base_method, figure, label_styles, save


def _groups(df: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame]]:
    return [(k if isinstance(k, tuple) else (k,), g) for k, g in df.groupby(GROUP_KEYS, sort=False, dropna=False)]


def _bars(d: pd.DataFrame, y: str) -> np.ndarray | None:
    lo, hi = f"{y}_lo", f"{y}_hi"
    if lo not in d or hi not in d:
        return None
    err = np.vstack([(d[y] - d[lo]).to_numpy(float), (d[hi] - d[y]).to_numpy(float)])
    return np.nan_to_num(err, nan=0.0)


def _pareto_panels(groups: list[tuple[tuple, pd.DataFrame]]) -> list[tuple[tuple, pd.DataFrame, str]]:
    """Per group, a panel of each method's own configuration and, where the group holds
    variants (another setting than the method's default, such as FATR's fidelity sweeps), a
    panel of the variants next to their methods' own lines: a dozen variants of one method
    drawn among sixteen methods hid the comparison the figure is for."""
    panels = []
    for key, g in groups:
        reduced = g[g["method"] != "none"]
        own = reduced["label"] == reduced["method"]
        base = g[g["method"] == "none"]
        if own.all():
            panels.append((key, g, ""))
            continue
        varied = reduced.loc[~own, "method"].unique()
        panels.append((key, pd.concat([reduced[own], base]), "each method's own configuration"))
        beside = reduced[own & reduced["method"].isin(varied)]
        panels.append((key, pd.concat([reduced[~own], beside, base]), "variants, beside their method"))
    return panels


def plot_pareto(df: pd.DataFrame, path: Path) -> Path | None:
    """Top-1 vs fvcore GMACs per configuration, with each point's 95% interval."""
    d = df.dropna(subset=["top1", "gmacs"])
    panels = _pareto_panels(_groups(d))
    if not panels:
        return None
    colors, markers = label_styles(d.loc[d["method"] != "none", "label"])
    ncols = 1 if len(panels) <= 2 else 2  # one above the other: the README shows it at page width
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = figure(ncols, 8.0 * ncols, 5.0 * nrows, nrows=nrows)
    for ax, (key, g, what) in zip(axes, panels, strict=False):
        for label, line in g[g["method"] != "none"].groupby("label", sort=True):
            line = line.sort_values("gmacs")
            ax.errorbar(
                line["gmacs"],
                line["top1"],
                yerr=_bars(line, "top1"),
                color=colors[label],
                marker=markers[label],
                ms=6,
                lw=1.3,
                capsize=2,
                elinewidth=0.8,
                label=label,
            )
        base = g[g["method"] == "none"]
        if not base.empty:
            ax.errorbar(
                base["gmacs"],
                base["top1"],
                yerr=_bars(base, "top1"),
                marker="*",
                ms=16,
                color="black",
                ls="none",
                capsize=3,
                label="unreduced",
                zorder=5,
            )
        ax.set_title(group_title(key) + (f"\n{what}" if what else ""), fontsize=9)
        ax.set_xlabel("GMACs per image (fvcore)")
        ax.set_ylabel("top-1 accuracy (%), 95% interval")
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.axis("off")
    return save(fig, path, "Accuracy vs compute (bars: 95% interval of each top-1)", legend_ax=axes[: len(panels)])


def plot_differences(df: pd.DataFrame, path: Path) -> Path | None:
    """Per group and budget: each method's paired Δ top-1 from the best, with its interval."""
    from matplotlib.ticker import MaxNLocator

    need = {"top1_d_best", "top1_d_best_lo", "top1_d_best_hi"}
    if not need <= set(df.columns):
        return None
    d = df[(df["method"] != "none") & df["budget"].notna() & df["top1_d_best"].notna()]
    panels = [(key, b, at) for key, g in _groups(d) for b, at in sorted(g.groupby("budget"), key=lambda t: -t[0])]
    if not panels:
        return None
    colors, _ = label_styles(d["label"])
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    tallest = max(len(at) for *_, at in panels)
    fig, axes = figure(ncols, 5.2 * ncols, (0.32 * tallest + 1.4) * nrows, nrows=nrows)
    several_groups = len({key for key, *_ in panels}) > 1
    for ax, (key, budget, at) in zip(axes, panels, strict=False):
        at = at.sort_values(["top1_d_best", "label"], ascending=[True, False])
        ys = np.arange(len(at))
        for y, (_, r) in zip(ys, at.iterrows(), strict=True):
            tied = r.get("top1_tied") in ("tied", "best")
            ax.errorbar(
                r["top1_d_best"],
                y,
                xerr=np.nan_to_num(
                    [[r["top1_d_best"] - r["top1_d_best_lo"]], [r["top1_d_best_hi"] - r["top1_d_best"]]]
                ),
                fmt="o",
                color=colors[r["label"]],
                mfc=colors[r["label"]] if tied else "white",
                ms=6,
                capsize=2,
            )
        ax.axvline(0.0, color="black", lw=1)
        ax.set_yticks(ys, [str(v) for v in at["label"]], fontsize=7)
        title = f"MACs target {budget:.2f}"
        ax.set_title(title + (f"\n{group_title(key)}" if several_groups else ""), fontsize=8)
        ax.set_xlabel("Δ top-1 vs best at this budget (points)", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))  # a narrow panel's default ticks ran together
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(alpha=0.3, axis="x")
    for ax in axes[len(panels) :]:
        ax.axis("off")
    subtitle = "" if several_groups else f"\n{group_title(panels[0][0])}"
    return save(
        fig,
        path,
        "Difference from the best method, paired 95% interval (filled: tied with the best)" + subtitle,
    )


def _budget_text(v) -> str:
    return "own knob" if v is None or v != v else f"{v:.2f}"


_BELOW_X_LABEL_INCHES = 0.55
"""How far below its axes a legend under the x axis starts: below the tick labels and the x label."""


def plot_latency(df: pd.DataFrame, path: Path) -> Path | None:
    """Speedup per method and budget (bars, whiskers: interquartile range of the per-iteration
    ratios) and speedup vs MACs ratio, one row of panels per group."""
    import matplotlib.pyplot as plt
    from matplotlib.transforms import ScaledTranslation

    d = df[(df["method"] != "none") & df["speedup"].notna()].copy()
    groups = _groups(d)
    if not groups:
        return None
    colors, markers = label_styles(d["label"])
    budgets = sorted(d["budget"].dropna().unique())
    hue_order = [_budget_text(b) for b in budgets] + (["own knob"] if d["budget"].isna().any() else [])
    cmap = plt.get_cmap("viridis")
    hue_color = {h: cmap(k / max(1, len(budgets) - 1) * 0.9) for k, h in enumerate(hue_order)}
    hue_color["own knob"] = "#9e9e9e"
    # horizontal bars, one row per method: long variant names stay readable, and the panel
    # grows with the number of rows instead of being squeezed by rotated labels
    heights = [max(4.5, 0.32 * g["label"].nunique() + 1.5) for _, g in groups]
    fig, axes = figure(2, 15, sum(heights), nrows=len(groups))
    for row, (key, g) in enumerate(groups):
        ax, ax2 = axes[2 * row], axes[2 * row + 1]
        g = g.assign(hue=g["budget"].map(_budget_text))
        labels = sorted(g["label"].unique(), key=lambda s: (base_method(s), len(s), s))  # variants by their method
        width = 0.8 / len(hue_order)
        for k, h in enumerate(hue_order):
            part = g[g["hue"] == h]
            if "timestamp" in part:  # two configs of one label (say, images from two paths): the newest
                part = part.sort_values("timestamp").drop_duplicates("label", keep="last")
            part = part.set_index("label").reindex(labels)
            ys = np.arange(len(labels)) + (k - (len(hue_order) - 1) / 2) * width
            err = None
            if {"speedup_q1", "speedup_q3"} <= set(part.columns):
                err = np.nan_to_num(
                    np.vstack([part["speedup"] - part["speedup_q1"], part["speedup_q3"] - part["speedup"]]), nan=0.0
                )
            ax.barh(ys, part["speedup"], width, xerr=err, color=hue_color[h], label=h, error_kw={"elinewidth": 0.8})
        ax.set_yticks(np.arange(len(labels)), labels, fontsize=7)
        ax.set_ylim(len(labels) - 0.5, -0.5)  # first method at the top
        ax.axvline(1.0, color="black", lw=1)
        ax.set_xlabel("speedup vs unreduced (×), whiskers: IQR")
        ax.set_title(group_title(key), fontsize=9)
        ax.legend(
            title="MACs target",
            fontsize=7,
            title_fontsize=7,
            ncol=len(hue_order),
            loc="upper center",
            # a fixed distance below the axes, under the x label: a share of the axes' height
            # (it was 9%) put it on the label in a short panel of a few methods
            bbox_to_anchor=(0.5, 0.0),
            bbox_transform=ax.transAxes + ScaledTranslation(0, -_BELOW_X_LABEL_INCHES, fig.dpi_scale_trans),
            frameon=False,
        )
        if "macs_ratio" in g and g["macs_ratio"].notna().any():
            for label, pts in g.groupby("label", sort=True):
                err = None
                if {"speedup_q1", "speedup_q3"} <= set(pts.columns):
                    err = np.nan_to_num(
                        np.vstack([pts["speedup"] - pts["speedup_q1"], pts["speedup_q3"] - pts["speedup"]]), nan=0.0
                    )
                ax2.errorbar(
                    pts["macs_ratio"],
                    pts["speedup"],
                    yerr=err,
                    fmt=markers[label],
                    color=colors[label],
                    ms=6,
                    capsize=2,
                    elinewidth=0.8,
                    label=label,
                )
            lo = float(g["macs_ratio"].min()) * 0.95
            grid = np.linspace(lo, 1.0, 51)
            ax2.plot(grid, 1 / grid, "k--", lw=1, label="speedup = 1 / MACs ratio")
            ax2.set_xlabel("MACs ratio (reduced / unreduced)")
            ax2.set_ylabel("measured speedup (×), whiskers: IQR")
        else:
            ax2.axis("off")
        for a in (ax, ax2):
            a.grid(alpha=0.3)
    title = "Latency at each row's largest latency batch (speedup = median of per-iteration ratios)"
    return save(fig, path, title, legend_ax=axes[1::2])
