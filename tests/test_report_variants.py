"""The leaderboard's 'variants against their method's default' section, on a constructed store."""

from __future__ import annotations

import numpy as np

from bench.leaderboard import latest_per_config, write_leaderboard
from bench.measure.outcomes import Outcomes, save_outcomes
from bench.report.variants import variant_rows
from bench.store import append_record, read_records

N = 300
IDS = np.array([f"n{i % 30:08d}/img_{i}.JPEG" for i in range(N)])
LABELS = (np.arange(N) % 30).astype(np.int16)


def _record(results, variant, budget, correct, agree, outcomes=True):
    metrics = {"top1": 100 * correct.mean(), "agreement": 100 * agree.mean(), "gmacs": 0.8}
    if outcomes:
        o = Outcomes(IDS, LABELS.copy(), LABELS, correct, agree, correct)
        metrics["outcomes_file"] = save_outcomes(results, f"r{len(read_records(results))}", o)
    config = {"method": {"name": "fatr", "variant": variant}, "model": {"name": "m"}, "budget": {"b": budget}}
    append_record(
        results,
        {
            "config_hash": f"h{variant}{budget}",
            "method": "fatr",
            "variant": variant,
            "model": "m",
            "data_root": "/d/val",
            "num_images": N,
            "budget": {"macs_ratio_target": budget},
            "config": config,
            "metrics": metrics,
            "device": "CPU",
            "timestamp": f"2026-01-01T00:00:{len(read_records(results)):02d}",
        },
    )


def test_variants_are_compared_with_their_default_at_the_same_budget(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.random(N) < 0.8
    same = base.copy()
    worse = base.copy()
    worse[np.flatnonzero(base)[:40]] = False  # 40 images lost, none gained: a real difference
    ones = np.ones(N, bool)
    _record(tmp_path, "", 0.65, base, ones)
    _record(tmp_path, "score=svd", 0.65, worse, worse == base)
    _record(tmp_path, "dc_grid=2", 0.65, same, ones)
    _record(tmp_path, "dc_weight=attn", 0.5, base, ones)  # no default at 0.50: no row
    _record(tmp_path, "score=abs", 0.65, base, ones, outcomes=False)
    rows = {r["variant"]: r for r in variant_rows(latest_per_config(read_records(tmp_path)), tmp_path)}
    assert set(rows) == {"score=svd", "dc_grid=2", "score=abs"}
    svd = rows["score=svd"]
    assert abs(svd["d_top1"].estimate + 100 * 40 / N) < 1e-9 and svd["d_top1"].high < 0
    assert svd["p_top1"] < 1e-6
    tie = rows["dc_grid=2"]
    assert tie["d_top1"].low == tie["d_top1"].high == 0 and tie["p_top1"] == 1.0
    assert "d_top1" not in rows["score=abs"]
    write_leaderboard(tmp_path)
    md = (tmp_path / "leaderboard.md").read_text()
    assert "## Variants against their method's default" in md
    assert "| fatr | dc_grid=2 | 0.65 |" in md and "(tie)" in md
    assert "– (no per-image outcomes)" in md
