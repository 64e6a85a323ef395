"""The ``model`` group's sizes (DeiT-Tiny/Small/Base, ViT-Large) and random weights for them.

Only DeiT-Tiny has real weights here; the others are timed on random ones, which must stay
timing-only: refused up front for accuracy and spectral numbers, and labelled on every row.
Budget matching is analytic, so each architecture is built once, on the meta device (no
weights allocated), and every method's budget is solved on it without a forward.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from bench_utils import FAST, REPO, compose, image_folder, run_cli
from conftest import build_reducer, method_names
from omegaconf import OmegaConf

from bench.budget import match_budget, solve_budget
from bench.errors import BenchError
from bench.measure.flops import VitShape
from bench.store import read_records
from methods.identity import NoReduction
from methods.patch import model_info

MODEL_CONF = REPO / "bench" / "conf" / "model"
SIZES = {
    "deit_tiny": ("deit_tiny_patch16_224", 1.26),
    "deit_small": ("deit_small_patch16_224", 4.6),
    "deit_base": ("deit_base_patch16_224", 17.6),
    "vit_large": ("vit_large_patch16_224", 61.6),
}
"""Config name: timm name and the published GMACs per 224 px image (DeiT paper, timm's tables)."""
RATIO, TOLERANCE = 0.65, 0.02
NO_MODEL = [o for o in FAST if not o.startswith("model.")]
TIMING_ONLY = ["bench.accuracy=false", "bench.spectral.enabled=false"]
REFUSED = (
    "error: model.random_init=true gives random weights: accuracy, agreement and spectral numbers would mean "
    "nothing (random weights are for FLOPs, latency and scaling only); set bench.accuracy=false "
    "bench.spectral.enabled=false, or give real weights (model.checkpoint=PATH or FATR_CHECKPOINT=PATH or "
    "model.pretrained=true)"
)


@pytest.fixture(scope="module")
def architectures() -> dict[str, torch.nn.Module]:
    """Each size once per module, on the meta device: shapes without 300M parameters of memory."""
    with torch.device("meta"):
        return {size: timm.create_model(name) for size, (name, _) in SIZES.items()}


def test_every_size_is_a_config_with_deit_tinys_keys():
    tiny = set(OmegaConf.load(MODEL_CONF / "deit_tiny.yaml"))
    assert sorted(p.stem for p in MODEL_CONF.glob("*.yaml")) == sorted(SIZES)
    for size, (name, _) in SIZES.items():
        model = compose([f"model={size}"]).model
        assert set(model) == tiny and model.name == name
        assert not model.random_init and model.checkpoint is None and not model.pretrained


def test_unreduced_macs_match_the_published_size(architectures):
    """The meta-device models are the real architectures: their analytic MACs are the known ones."""
    for size, model in architectures.items():
        sol = match_budget(NoReduction(), 1.0, VitShape.of(model), model_info(model))
        assert sol.baseline_macs / 1e9 == pytest.approx(SIZES[size][1], rel=0.03), size


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("method", method_names())
def test_every_method_meets_the_budget_at_every_size(architectures, size, method):
    reducer, budget = solve_budget(build_reducer(method), RATIO, TOLERANCE, architectures[size], method)
    if method == "none":  # the reference: no budget to solve
        assert isinstance(reducer, NoReduction) and budget == {"macs_ratio_target": RATIO}
        return
    assert budget["macs_ratio_analytic"] == pytest.approx(RATIO, rel=TOLERANCE)
    assert reducer.hparams[budget["knob"]] == pytest.approx(budget["knob_value"])


# -- random weights: timing only, said on every row ----------------------------------------------


def _run_cfg(tmp_path: Path, *overrides: str):
    root = image_folder(tmp_path / "val", 1, 2)
    return compose(["method=tome", f"data.root={root}", f"results_dir={tmp_path / 'r'}", *NO_MODEL, *overrides])


@pytest.mark.parametrize(
    "switches, refused",
    [
        ([], "accuracy, agreement and spectral numbers would mean nothing"),
        (["bench.spectral.enabled=false"], "accuracy and agreement numbers .* set bench.accuracy=false, or give"),
        (["bench.accuracy=false"], ": spectral numbers .* set bench.spectral.enabled=false, or give real weights"),
    ],
)
def test_random_weights_refuse_accuracy_and_spectral_before_anything(tmp_path, monkeypatch, switches, refused):
    from bench.job import run_job

    loads = []
    monkeypatch.setattr("bench.job.load_model", lambda *a, **k: loads.append(a))
    cfg = _run_cfg(tmp_path, "model=vit_large", "model.random_init=true", "model.checkpoint=null", *switches)
    with pytest.raises(BenchError, match=refused):
        run_job(cfg)
    assert not loads and not (tmp_path / "r").exists()


def test_a_checkpoint_beside_random_init_is_real_weights():
    from bench.validate import read_config, validate_settings

    validate_settings(read_config(compose(["model.random_init=true", "model.checkpoint=/some/file.safetensors"])))


def test_finetuning_random_weights_is_refused_before_anything():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from bench.finetune_job import run_finetune

    with initialize_config_dir(config_dir=str(REPO / "bench" / "conf"), version_base="1.3"):
        cfg = hydra_compose("finetune", overrides=["model=deit_base", "model.random_init=true"])
    with pytest.raises(BenchError, match="random weights: fine-tuning toward a random teacher would mean nothing"):
        run_finetune(cfg)


def test_random_weights_time_and_every_row_says_so(tmp_path):
    """FLOPs, latency and scaling on random DeiT-Tiny weights (the cheapest size): recorded as
    random, labelled in the summary, the leaderboard's heading and a line under its table."""
    from bench.job import run_job
    from bench.leaderboard import summary, table, write_leaderboard

    record = run_job(_run_cfg(tmp_path, "model.random_init=true", "model.checkpoint=null", *TIMING_ONLY))
    assert record["config"]["model"]["random_init"] is True
    assert {"gmacs", "speedup", "scaling"} <= set(record["metrics"]) and "top1" not in record["metrics"]
    records = read_records(tmp_path / "r")
    assert list(table(records)["model"]) == ["deit_tiny_patch16_224 (random weights)"] * 2
    rows = summary(records).splitlines()[1:]
    assert len(rows) == 2 and all("deit_tiny_patch16_224 (random weights)" in row for row in rows)
    write_leaderboard(tmp_path / "r")
    board = (tmp_path / "r" / "leaderboard.md").read_text()
    assert "## deit_tiny_patch16_224 (random weights) on val" in board
    assert "**All rows: random weights** (model.random_init=true)" in board


def test_random_weights_with_accuracy_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    """A sweep of two jobs: refused once, before the first (the check runs when the sweep starts)."""
    root = image_folder(tmp_path / "val", 1, 1)
    out = run_cli(
        ["method=tome,evit", "model=deit_base", "model.random_init=true", "model.checkpoint=null"]
        + [f"data.root={root}", "bench.spectral.enabled=true", *NO_MODEL],
        tmp_path,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert [line for line in out.stderr.splitlines() if line.strip()] == [REFUSED]
    assert not (tmp_path / "results" / "runs.jsonl").exists()


@pytest.mark.parametrize(
    "override,start,names",
    [
        ("model=deit_huge", "error: model=deit_huge: no such model; choose one of ", SIZES),
        ("method=tome,tomx", "error: method=tomx: no such method; choose one of ", ["tome", "fatr", "evit", "none"]),
    ],
)
def test_an_option_a_group_lacks_is_one_line_listing_the_group_and_exit_2(tmp_path, override, start, names):
    """Hydra's own report is several lines with its search path, and exit 1; the sweep of two
    jobs fails before its first job, so nothing is recorded."""
    out = run_cli([override], tmp_path)
    lines = [line for line in out.stderr.splitlines() if line.strip().startswith("error:")]
    assert out.returncode == 2 and "Traceback" not in out.stderr and "Config search path" not in out.stderr
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(start)
    assert all(name in lines[0] for name in names)
    assert not (tmp_path / "results" / "runs.jsonl").exists()
