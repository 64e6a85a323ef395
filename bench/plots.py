"""The few plotting conventions every results figure shares: one line per method, markers,
and the legend outside the axes so it never hides a curve."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def figure(ncols: int = 1, width: float = 7.0, height: float = 4.5):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width, height), squeeze=False)
    return fig, list(axes[0])


def palette(n: int) -> list:
    """Distinct colours for up to 20 methods (seaborn's default repeats after 10)."""
    import seaborn as sns

    return sns.color_palette("tab10" if n <= 10 else "tab20", n)


def lines_by_method(ax, data: pd.DataFrame, x: str, y: str, hue: str = "method") -> None:
    """One line per ``hue`` value with markers; the axis legend is removed (see :func:`save`)."""
    import seaborn as sns

    sns.lineplot(
        data=data,
        x=x,
        y=y,
        hue=hue,
        style=hue,
        markers=True,
        dashes=False,
        markersize=7,
        palette=palette(data[hue].nunique()),
        ax=ax,
    )
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    ax.grid(alpha=0.3, which="both")


def save(fig, path: Path, title: str, legend_ax=None) -> Path:
    """Title, one legend to the right of the plots (from ``legend_ax``), save, close."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    if legend_ax is not None:
        handles, labels = legend_ax.get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
