"""Figures a reader can decode: every method found by its colour and marker."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
from matplotlib.colors import to_rgb

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
