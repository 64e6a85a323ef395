"""Figures a reader can decode: every method found by its colour and marker, and the accuracy
figure's methods not buried under one method's variants."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.colors import to_rgb

from bench.report import plots
from bench.report.style import MARKERS, METHOD_COLORS, METHOD_MARKERS, label_styles, method_marker

BUILT_IN = sorted(p.stem for p in (Path(__file__).parents[1] / "bench" / "conf" / "method").glob("*.yaml"))
NEAR = 0.45
"""Colours closer than this (Euclidean, RGB in [0, 1]) are told apart by the marker."""


@pytest.mark.parametrize("name", [n for n in BUILT_IN if n != "none" and not n.startswith("diffrate_")])
def test_every_built_in_method_has_its_own_colour_and_a_drawable_marker(name):
    assert name in METHOD_COLORS and METHOD_MARKERS[name] in MARKERS


def test_methods_of_near_colours_never_share_a_marker():
    near = [
        (a, b)
        for a, b in itertools.combinations(METHOD_MARKERS, 2)
        if 0 < math.dist(to_rgb(METHOD_COLORS[a]), to_rgb(METHOD_COLORS[b])) < NEAR  # 0: none and unreduced
    ]
    assert ("pool", "ppt") in near or ("ppt", "pool") in near  # the check has near pairs to check
    assert [(a, b) for a, b in near if METHOD_MARKERS[a] == METHOD_MARKERS[b]] == []


def test_a_plain_label_has_its_methods_marker_and_variants_others():
    colors, markers = label_styles(["tome", "tome (prop_attn=False)", "fatr", "mine", "mine (k=2)"])
    assert markers["tome"] == METHOD_MARKERS["tome"] and markers["fatr"] == METHOD_MARKERS["fatr"]
    assert markers["tome (prop_attn=False)"] != markers["tome"]
    assert colors["tome (prop_attn=False)"] != colors["tome"]
    assert markers["mine"] == method_marker("mine") == method_marker("mine (k=2)") != markers["mine (k=2)"]


def _rows(labels: list[tuple[str, str]]) -> pd.DataFrame:
    group = {"model": "m", "dataset": "d", "images": 10, "device": "cpu", "latency_mode": "eager"}
    out = [{**group, "method": "none", "label": "none", "top1": 80.0, "gmacs": 1.0}]
    for k, (method, label) in enumerate(labels):
        out.append({**group, "method": method, "label": label, "top1": 70.0 + k, "gmacs": 0.65})
    return pd.DataFrame(out).assign(latency_precision="fp32")


def _drawn(monkeypatch, df: pd.DataFrame, tmp_path: Path) -> list[tuple[str, list[str]]]:
    seen = []

    def capture(fig, path, title, legend_ax=None, **_):
        for ax in legend_ax:
            seen.append((ax.get_title(), sorted(ax.get_legend_handles_labels()[1])))
        return path

    monkeypatch.setattr(plots, "save", capture)
    assert plots.plot_pareto(df, tmp_path / "pareto.png") is not None
    return seen


def test_the_accuracy_figure_draws_variants_in_a_panel_of_their_own(monkeypatch, tmp_path):
    df = _rows([("fatr", "fatr"), ("fatr", "fatr (score=std)"), ("tome", "tome"), ("evit", "evit")])
    (own_title, own), (var_title, var) = _drawn(monkeypatch, df, tmp_path)
    assert own_title.endswith("each method's own configuration")
    assert own == ["evit", "fatr", "tome", "unreduced"]
    assert var_title.endswith("variants, beside their method")
    assert var == ["fatr", "fatr (score=std)", "unreduced"]  # other methods stay in the first panel


def test_without_variants_the_accuracy_figure_is_one_panel(monkeypatch, tmp_path):
    df = _rows([("fatr", "fatr"), ("tome", "tome")])
    assert _drawn(monkeypatch, df, tmp_path) == [("m on d (10 images), cpu", ["fatr", "tome", "unreduced"])]
