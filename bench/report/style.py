"""The few plotting conventions every results figure shares: one fixed colour per method in
every plot, one line per method with markers, readable log ticks, and the legend outside the
axes so it never hides data."""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

METHOD_COLORS = {
    "unreduced": "#000000",
    "none": "#000000",
    "fatr": "#d62728",
    "tome": "#1f77b4",
    "evit": "#2ca02c",
    "topk": "#ff7f0e",
    "random": "#7f7f7f",
    "pool": "#8c564b",
    "kmedoids": "#9467bd",
    "dpcknn": "#17becf",
    "pitome": "#e377c2",
    "tofu": "#bcbd22",
    "dct": "#393b79",
    "diffrate": "#637939",
    "ats": "#8c6d31",
    "ppt": "#843c39",
    "mctf": "#7b4173",
    "zerotprune": "#1b9e77",
}
"""Neighbours in the tables (fatr/random, evit/topk, dpcknn/kmedoids) get unlike hues."""
OTHER_COLORS = ["#e377c2", "#bcbd22", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd"]
MARKERS = ["o", "s", "^", "v", "<", ">", "D", "d", "P", "X"]
"""Filled markers that stay unlike at the plots' small sizes (a pentagon, a hexagon and an
octagon all read as circles there; the C++-wrapper timings are drawn hollow, which a line
marker such as ``x`` cannot be)."""
METHOD_MARKERS = {
    "unreduced": "o",
    "none": "o",
    "fatr": "o",
    "tome": "s",
    "evit": "^",
    "topk": "v",
    "random": "D",
    "pool": "P",
    "ppt": "X",
    "ats": "<",
    "diffrate": ">",
    "mctf": "d",
    "kmedoids": "v",
    "dpcknn": "X",
    "pitome": "D",
    "tofu": "s",
    "dct": "^",
    "zerotprune": "o",
}
"""With sixteen methods some colours are near (the browns of pool, ATS and PPT; the blues of ToMe,
DCT and DPC-kNN): the marker tells those apart, so that a method can be found by its symbol
where the lines crowd. Ten shapes for sixteen methods: a shape used twice goes to methods of
unlike hue."""


def figure(ncols: int = 1, width: float = 7.0, height: float = 4.5, nrows: int = 1):
    """A figure and its axes as a flat list (row by row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False)
    return fig, [ax for row in axes for ax in row]


def palette(n: int) -> list:
    """Distinct colours for up to 20 unnamed series (seaborn's default repeats after 10);
    methods use :func:`label_styles` instead, so a method keeps its colour in every plot."""
    import seaborn as sns

    return sns.color_palette("tab10" if n <= 10 else "tab20", n)


def base_method(label: str) -> str:
    """``fatr (score=std) @0.65`` -> ``fatr``: what decides a label's colour."""
    return re.split(r"[\s@(]", label.strip(), maxsplit=1)[0]


def _fixed_for_method(name: str, fixed: dict[str, str], others: list[str]) -> str:
    """A built-in method's own entry of ``fixed``; a user's method a stable one of ``others``
    chosen from its name, the same in every run."""
    base = base_method(name)
    if base in fixed:
        return fixed[base]
    return others[zlib.crc32(base.encode()) % len(others)]


def method_marker(name: str) -> str:
    """The fixed marker of a method (a user's method gets a stable one from its name)."""
    return _fixed_for_method(name, METHOD_MARKERS, MARKERS)


def method_color(name: str) -> str:
    """The fixed colour of a method (a user's method gets a stable one from its name)."""
    return _fixed_for_method(name, METHOD_COLORS, OTHER_COLORS)


def label_styles(labels: Iterable[str]) -> tuple[dict[str, tuple], dict[str, str]]:
    """Colour and marker per label: a method's own colour and marker for its plain label,
    lighter and darker shades of the colour (and the markers after its own) for its variants."""
    from matplotlib.colors import to_rgb

    by_method: dict[str, list[str]] = {}
    for label in sorted(set(labels), key=lambda s: (len(s), s)):
        by_method.setdefault(base_method(label), []).append(label)
    colors, markers = {}, {}
    for method, group in by_method.items():
        base = to_rgb(method_color(method))
        first = MARKERS.index(method_marker(method))
        for k, label in enumerate(group):
            toward = (1.0, 1.0, 1.0) if k % 2 else (0.0, 0.0, 0.0)
            t = 0.0 if k == 0 else min(0.6, 0.2 * ((k + 1) // 2))
            colors[label] = tuple(b + (w - b) * t for b, w in zip(base, toward, strict=True))
            markers[label] = MARKERS[(first + k) % len(MARKERS)]
    return colors, markers


def lines_by_method(ax, data: pd.DataFrame, x: str, y: str, hue: str = "method") -> None:
    """One line per ``hue`` value with markers; the axis legend is removed (see :func:`save`)."""
    import seaborn as sns

    colors, markers = label_styles(data[hue])
    sns.lineplot(
        data=data,
        x=x,
        y=y,
        hue=hue,
        style=hue,
        markers=markers,
        dashes=False,
        markersize=7,
        palette=colors,
        ax=ax,
    )
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    ax.grid(alpha=0.3, which="both")


def log_ticks(ax, values: Iterable[float], axis: str = "x") -> None:
    """Ticks at the measured values only, plainly labelled, so log-axis labels never overlap."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    ticks = sorted({float(v) for v in values})
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(FixedLocator(ticks))
    target.set_major_formatter(lambda v, _: f"{v:g}")
    target.set_minor_locator(NullLocator())
    target.set_minor_formatter(NullFormatter())


def save(fig, path: Path, title: str, legend_ax=None, legend: list[tuple[object, str]] | None = None) -> Path:
    """Title, one legend to the right of the plots (from ``legend_ax``, one axis or several, or
    the ``(handle, text)`` pairs of ``legend``), save, close."""
    import matplotlib.pyplot as plt

    height = fig.get_size_inches()[1]
    fig.suptitle(title, fontsize=10, y=1 - 0.08 / height, va="top")  # a fixed band, whatever the height
    axes = legend_ax if isinstance(legend_ax, (list, tuple)) else [legend_ax] if legend_ax is not None else []
    seen: dict[str, object] = {}
    for handle, label in legend or []:
        seen.setdefault(label, handle)
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(
            list(seen.values()),
            list(seen),
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            fontsize=8,
            frameon=False,
            handlelength=3.0,  # long enough to show a dashed or dotted line's pattern
        )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.28 / height))  # the panels start below the title's band
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
