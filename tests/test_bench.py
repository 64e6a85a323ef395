"""The harness pieces: MACs counts, budget matching, run store, leaderboard, bad input."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from bench_utils import FAST, compose, image_folder
from conftest import build_reducer, method_names

from bench.budget import match_budget
from bench.errors import BenchError
from bench.job import run_job
from bench.leaderboard import table, write_leaderboard
from bench.measure.flops import VitShape, analytic_macs, fvcore_macs
from bench.models import load_checkpoint
from bench.store import append_record, read_records
from methods import apply_reducer
from methods.patch import model_info


@pytest.fixture(scope="module")
def deit():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224").eval()


def _methods():
    return [m for m in method_names() if not m.startswith("test_")]


@pytest.mark.parametrize("method", _methods())
def test_fvcore_and_analytic_macs_agree_within_2_percent(deit, method):
    reducer = build_reducer(method)
    apply_reducer(deit, reducer)
    x = torch.randn(1, 3, 224, 224)
    counted = fvcore_macs(deit, x)
    analytic = analytic_macs(VitShape.of(deit), reducer, 196)
    assert abs(counted / analytic - 1) < 0.02, (method, counted, analytic)


def test_fvcore_counts_fused_attention(deit):
    apply_reducer(deit, build_reducer("none"))
    counted = fvcore_macs(deit, torch.randn(1, 3, 224, 224))
    attention = 12 * 2 * 197 * 197 * 192
    linear_only = analytic_macs(VitShape.of(deit), build_reducer("none"), 196) - attention
    assert counted > linear_only + 0.98 * attention, "SDPA must be counted"


@pytest.mark.parametrize("method", [m for m in _methods() if build_reducer(m).budget_knob])
def test_budget_matching_hits_the_target(deit, method):
    info = model_info(deit)
    sol = match_budget(build_reducer(method), 0.65, VitShape.of(deit), info, method=method)
    assert abs(sol.ratio / 0.65 - 1) < 0.02
    apply_reducer(deit, sol.reducer)
    base = fvcore_macs(_plain(deit), torch.randn(1, 3, 224, 224))
    counted = fvcore_macs(deit, torch.randn(1, 3, 224, 224))
    assert abs(counted / base / 0.65 - 1) < 0.03


def _plain(model):
    import copy

    m = copy.deepcopy(model)
    apply_reducer(m, build_reducer("none"))
    return m


def test_impossible_budget_names_the_reachable_range(deit):
    with pytest.raises(BenchError, match=r"impossible for method evit: it reaches macs_ratio 0\.\d+\.\.1\.000"):
        match_budget(build_reducer("evit"), 0.05, VitShape.of(deit), model_info(deit), method="evit")
    with pytest.raises(BenchError, match="must be in"):
        match_budget(build_reducer("evit"), 1.5, VitShape.of(deit), model_info(deit))


def test_store_survives_a_torn_write(tmp_path):
    append_record(tmp_path, {"config_hash": "a", "x": 1})
    with open(tmp_path / "runs.jsonl", "a") as f:
        f.write('{"config_hash": "b", "x"')  # a job killed mid-write
    append_record(tmp_path, {"config_hash": "c", "x": 3})
    with pytest.warns(UserWarning, match="not a complete record"):
        recs = read_records(tmp_path)
    assert [r["config_hash"] for r in recs] == ["a", "c"]
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["x"] == 3


def test_checkpoint_mismatch_names_keys(tmp_path, deit):
    sd = {k: v for k, v in deit.state_dict().items() if k != "head.bias"}
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(BenchError, match=r"missing keys: head\.bias; unexpected keys: extra\.weight"):
        load_checkpoint(timm.create_model("deit_tiny_patch16_224"), tmp_path / "bad.pt")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real (random-weight) job of every method on a tiny folder: records, leaderboard, plots."""
    tmp = tmp_path_factory.mktemp("run")
    root = image_folder(tmp / "val")
    results = tmp / "results"
    records = []
    for method in ("fatr", "tome", "evit"):
        cfg = compose([f"method={method}", f"data.root={root}", f"results_dir={results}", *FAST])
        records.append(run_job(cfg))
    return results, records


def test_job_records_every_measurement(tiny_run):
    results, records = tiny_run
    stored = read_records(results)
    assert [r["method"] for r in stored] == ["none", "fatr", "tome", "evit"]
    for r in records:
        m = r["metrics"]
        for key in (
            "top1",
            "top5",
            "agreement",
            "delta_top1",
            "gmacs",
            "gmacs_analytic",
            "params_m",
            "latency_ms",
            "img_per_s",
            "speedup",
            "speedup_efficiency",
            "peak_mem_mb",
            "spectral_blocks",
            "scaling",
            "alpha_latency",
            "hf_energy_last_rel",
            "fourier_dlog_pi_last",
            "cos_to_mean_last",
            "selection_iou",
        ):
            assert key in m, key
        assert abs(m["macs_ratio"] / 0.65 - 1) < 0.02
        assert abs(m["gmacs"] / m["gmacs_analytic"] - 1) < 0.02
        assert r["git_commit"] and r["device"].startswith("CPU") and r["config_hash"]
        assert r["num_images"] == 6


def test_leaderboard_files_are_generated(tiny_run):
    results, _ = tiny_run
    paths = write_leaderboard(results)
    names = {p.name for p in paths}
    assert {
        "leaderboard.md",
        "leaderboard.csv",
        "pareto.png",
        "latency.png",
        "spectral_energy.png",
        "spectral_bands.png",
        "fourier_dlog.png",
        "oversmoothing.png",
        "selection_iou.png",
        "scaling.png",
    } <= names
    md = (results / "leaderboard.md").read_text()
    assert "| none |" in md and "| fatr |" in md and "High-resolution scaling" in md
    assert "### The paper's frequency analysis" in md and "| unreduced |" in md
    assert "The claim that a reducer runs 4096×4096 images" in md
    df = table(read_records(results))
    assert list(df["method"])[0] == "none"


def test_resume_skips_recorded_configs(tiny_run):
    results, _ = tiny_run
    cfg = compose(
        ["method=tome", f"data.root={tiny_run[1][0]['data_root']}", f"results_dir={results}", "resume=true", *FAST]
    )
    before = len(read_records(results))
    assert run_job(cfg) is None
    assert len(read_records(results)) == before


@pytest.mark.parametrize(
    "override,match",
    [
        (["model.name=vit_tiny_nonexistent"], "unknown model 'vit_tiny_nonexistent'"),
        (["data.root=/nonexistent/val"], "data.root does not exist"),
        (["model.img_size=250"], "not divisible by the patch size 16"),
        (["budget.macs_ratio=0.05", "method=evit"], "impossible for method evit"),
        (["model.random_init=false", "model.checkpoint=/nope.safetensors"], "checkpoint not found"),
        (["method.reducer.keep_rate=1.5"], "keep_rate must be in"),
        (["method.reducer.blocks=[3,9,16]"], "outside the model's depth"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, override, match):
    root = image_folder(tmp_path / "val", 1, 1)
    cfg = compose([f"data.root={root}", f"results_dir={tmp_path / 'r'}", *FAST, *override])
    from methods import ReducerConfigError

    with pytest.raises((BenchError, ReducerConfigError), match=match):
        run_job(cfg)


def test_leaderboard_merges_runs_of_one_config_that_measured_different_things():
    from bench.leaderboard import latest_per_config

    config = {"method": {"name": "tome"}, "model": {}, "data": {}, "budget": {"macs_ratio": 0.65}, "device": "cpu"}
    full = {
        "config": {**config, "bench": {"scaling": True}},
        "config_hash": "h1",
        "timestamp": "2026-01-01T00:00:00",
        "method": "tome",
        "metrics": {"top1": 70.0, "alpha_latency": 1.2},
    }
    quick = {
        "config": {**config, "bench": {"scaling": False}},
        "config_hash": "h2",
        "timestamp": "2026-01-02T00:00:00",
        "method": "tome",
        "metrics": {"top1": 71.0},
    }
    other = {
        "config": {**config, "budget": {"macs_ratio": 0.5}, "bench": {}},
        "config_hash": "h3",
        "timestamp": "2026-01-03T00:00:00",
        "method": "tome",
        "metrics": {"top1": 60.0},
    }
    rows = latest_per_config([quick, full, other])
    assert len(rows) == 2
    merged = next(r for r in rows if r["config_hash"] == "h2")
    assert merged["metrics"] == {"top1": 71.0, "alpha_latency": 1.2}
