"""Metric records have a declared shape (``bench.measure.scaling.ScalingMetrics``,
``bench.measure.spectral.SpectralMetrics``) that the writer keeps and every reader relies on only as
far as it goes: optional keys (missing from older records) are read with ``.get``."""

from __future__ import annotations

from typing import Any

import torch
from bench_utils import FAST, image_folder, run_cli
from conftest import tiny_vit

from bench.measure.scaling import ScalingMetrics, ScalingPoint, scaling_metrics
from bench.measure.spectral import SpectralBlock, SpectralMetrics, spectral_metrics
from bench.report.labels import method_label
from bench.report.scaling import scaling_section
from methods.tome import ToMe


def _check_shape(d: dict[str, Any], shape: type) -> None:
    keys = set(d)
    assert shape.__required_keys__ <= keys, f"missing {sorted(shape.__required_keys__ - keys)}"
    assert keys <= shape.__required_keys__ | shape.__optional_keys__, (
        f"undeclared {sorted(keys - set(shape.__annotations__))}"
    )


def _scaling(sizes: list[int]) -> ScalingMetrics:
    return scaling_metrics(
        tiny_vit(), ToMe(r=4), sizes, torch.device("cpu"), warmup=0, iters=1, show_progress=False, claim_resolution=64
    )


def test_scaling_records_have_the_declared_shape_with_one_resolution_or_more():
    for sizes in ([32], [32, 48]):
        m = _scaling(sizes)
        _check_shape(m, ScalingMetrics)
        for point in m["scaling"]:
            _check_shape(point, ScalingPoint)


def test_spectral_records_have_the_declared_shape(images):
    m = spectral_metrics(tiny_vit(), ToMe(r=4), images[:2], num_bands=4)
    _check_shape(m, SpectralMetrics)
    for block in m["spectral_blocks"]:
        _check_shape(block, SpectralBlock)


def _without_optional_keys(m: ScalingMetrics) -> dict[str, Any]:
    """A record as an older harness could write it: only the keys every record has."""
    points = [{k: v for k, v in p.items() if k in ScalingPoint.__required_keys__} for p in m["scaling"]]
    return {**{k: v for k, v in m.items() if k in ScalingMetrics.__required_keys__}, "scaling": points}


def test_scaling_report_reads_single_resolution_and_older_records(tmp_path):
    m = _scaling([32])
    fresh = {"method": "tome", "budget": {"macs_ratio_target": 0.65}, "metrics": m, "device": "CPU test"}
    old = {**fresh, "method": "tome-old", "metrics": _without_optional_keys(m)}
    (tmp_path / "leaderboard.md").write_text("")
    assert scaling_section([fresh, old], tmp_path) == [tmp_path / "scaling.png"]
    md = (tmp_path / "leaderboard.md").read_text()
    assert f"| {method_label(fresh)} | 32 px | – | – | – | – |" in md.replace(" (busy machine)", "")
    assert f"| {method_label(old)} | 32 px | – | – | – | – | – |" in md


def test_a_sweep_at_one_scaling_resolution_renders_its_leaderboard(tmp_path):
    val = image_folder(tmp_path / "val", 2, 1)
    args = ["method=tome", f"data.root={val}", *FAST, "bench.scaling.resolutions=[224]"]
    args += ["bench.spectral.enabled=false", "bench.latency.enabled=false"]
    out = run_cli(args, tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    md = (tmp_path / "results" / "leaderboard.md").read_text()
    assert "## High-resolution scaling" in md and "| tome @0.65 | 224 px" in md
