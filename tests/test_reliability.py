"""Issue 12: no wrong number on the leaderboard, no hidden failure, no raw traceback.

Each case a user hit with bad input, interruption or concurrency, on tiny models and tiny
folders made here (never the real data).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from bench_utils import FAST, REPO, compose, image_folder, run_cli
from conftest import build_reducer, tiny_vit
from PIL import Image

from bench.data import load_imagenet_folder, synsets, to_rgb
from bench.errors import BenchError
from bench.job import MEASUREMENTS, run_job
from bench.leaderboard import markdown, table, write_leaderboard
from bench.measure.accuracy import predict
from bench.measure.latency import measure_latency
from bench.models import load_checkpoint, read_state_dict
from bench.results_io import check_writable
from bench.store import append_record, read_records, read_run_records
from methods.base import ModelInfo

QUICK = ["bench.spectral.enabled=false", "bench.scaling.enabled=false"]
ACCURACY_ONLY = [*QUICK, "bench.latency.enabled=false", "bench.flops=false"]


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("data") / "val", 2, 1)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# -- 1. every numeric setting validated before anything is measured or recorded ----------------


@pytest.mark.parametrize(
    "override,message",
    [
        ("bench.latency.batch_size=0", "bench.latency.batch_size must be an integer >= 1, got 0"),
        ("bench.latency.iters=0", "bench.latency.iters must be an integer >= 1, got 0"),
        ("bench.latency.warmup=-1", "bench.latency.warmup must be an integer >= 0, got -1"),
        ("bench.latency.threads=0", "bench.latency.threads must be an integer >= 1 or null, got 0"),
        ("data.batch_size=0", "data.batch_size must be an integer >= 1, got 0"),
        ("data.limit=0", "data.limit must be an integer >= 1 or null, got 0"),
        ("data.limit=2.5", "data.limit must be an integer >= 1 or null, got 2.5"),
        ("bench.spectral.images=0", "bench.spectral.images must be an integer >= 1, got 0"),
        ("bench.scaling.iters=0", "bench.scaling.iters must be an integer >= 1, got 0"),
        ("bench.scaling.warmup=-2", "bench.scaling.warmup must be an integer >= 0, got -2"),
        ("bench.scaling.batch_tokens=0", "bench.scaling.batch_tokens must be an integer >= 1, got 0"),
        (
            "bench.scaling.resolutions=[]",
            "bench.scaling.resolutions must be a non-empty list of positive integers, got []",
        ),
        (
            "bench.scaling.resolutions=[256,224]",
            "bench.scaling.resolutions must be strictly increasing, got [256, 224]",
        ),
        ("budget.macs_ratio=abc", "budget.macs_ratio must be a number in (0, 1] or null, got 'abc'"),
        ("budget.macs_ratio=0", "budget.macs_ratio must be a number in (0, 1] or null, got 0"),
        ("budget.macs_ratio=1.5", "budget.macs_ratio must be a number in (0, 1] or null, got 1.5"),
        ("budget.tolerance=abc", "budget.tolerance must be a number in (0, 0.5], got 'abc'"),
        ("budget.tolerance=0", "budget.tolerance must be a number in (0, 0.5], got 0"),
    ],
)
def test_every_numeric_setting_is_checked_before_the_job_starts(tmp_path, override, message):
    """A value of the wrong type (``abc``, ``2.5`` for an integer) is refused by the typed schema
    when Hydra composes the config, the others by the job's checks: the same message either way."""
    from hydra.errors import ConfigCompositionException

    from bench.validate import config_error

    results = tmp_path / "results"
    try:
        cfg = compose(["method=tome", "data.root=/not/read/yet", f"results_dir={results}", *FAST, override])
    except ConfigCompositionException as e:
        error = config_error(e)
    else:
        with pytest.raises(BenchError) as e:
            run_job(cfg)
        error = e.value
    assert str(error) == message
    assert not results.exists()


def test_an_unknown_device_is_one_line():
    from bench.job import resolve_device

    with pytest.raises(BenchError, match="device=gpu0 is not a device; use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")


@pytest.mark.parametrize("name", ["mps", "meta", "xpu"])
def test_a_device_the_harness_cannot_time_is_one_line(name):
    """Latency synchronises CUDA alone, so on another device (``mps``) the wall clock would time
    kernel launches, not forwards: refused before anything runs, not a wrong number."""
    from bench.job import resolve_device

    with pytest.raises(BenchError, match=f"^device={name}: the harness measures on the CPU and CUDA only"):
        resolve_device(name)


def test_a_cuda_index_the_machine_lacks_is_one_line(monkeypatch):
    from bench.job import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(BenchError, match=r"^device=cuda:2 but this machine has 2 CUDA device\(s\): cuda:0 to cuda:1$"):
        resolve_device("cuda:2")


def test_a_bug_in_one_job_is_one_line_with_the_traceback_kept(tmp_path, val):
    """Not bad input but a bug (a plug-in reducer raising IndexError): the sweep goes on, the
    failure is listed, the traceback is saved in the job's folder instead of printed."""
    (tmp_path / "buggy.py").write_text(
        "from methods import TokenReducer\n\n"
        "class Buggy(TokenReducer):\n"
        "    def reduces_at(self, block):\n"
        "        return block == 1\n\n"
        "    def reduce(self, state, block):\n"
        "        return [][0]\n"
    )
    conf = tmp_path / "conf" / "method"
    conf.mkdir(parents=True)
    (conf / "buggy.yaml").write_text("name: buggy\nreducer:\n  _target_: buggy.Buggy\n")
    args = [
        "method=buggy,evit",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        "budget.macs_ratio=null",
        f"data.root={val}",
        *FAST,
        *ACCURACY_ONLY,
    ]
    out = run_cli(args, tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "1 job(s) failed" in out.stderr
    saved = tmp_path / "sweep" / "0_buggy" / "traceback.txt"
    assert _errors(out.stderr) == [
        f"error: unexpected IndexError: list index out of range (a bug; traceback in {saved})"
    ]
    assert "return [][0]" in saved.read_text()
    assert [r["method"] for r in read_records(tmp_path / "results")] == ["none", "evit"]


def test_scaling_resolutions_must_be_whole_patches(tmp_path):
    cfg = compose(["method=tome", f"results_dir={tmp_path / 'r'}", *FAST, "bench.scaling.resolutions=[224,250]"])
    with pytest.raises(BenchError, match=r"resolutions \[250\] are not divisible by the patch size 16"):
        run_job(cfg)


def test_batch_size_zero_and_a_mistyped_root_record_nothing_and_create_no_results_dir(tmp_path, val):
    """Issue case 1 (an unreduced record measured with batch 0 reached the leaderboard) and
    'a failed job still creates results_dir with an empty leaderboard'."""
    args = ["method=tome", f"data.root={val}", *FAST, "bench.latency.batch_size=0"]
    out = run_cli(args, tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    # checked once for the sweep, before its first job: the one line is all it prints
    assert out.stderr.strip() == "error: bench.latency.batch_size must be an integer >= 1, got 0"
    assert not (tmp_path / "results").exists()

    out = run_cli(["method=tome", f"data.root={val}x", *FAST], tmp_path)
    assert out.returncode == 2 and "data.root does not exist" in out.stderr
    assert not (tmp_path / "results").exists(), "a failed job must not leave an empty leaderboard"


def test_a_swept_bad_setting_fails_each_job(tmp_path, val):
    """A swept setting is checked by each job, which fails alone (the other values' jobs would
    still run); a shared one is checked once before the first job (the test below)."""
    out = run_cli(["method=tome", f"data.root={val}", *FAST, "bench.latency.compile=turbo,warp"], tmp_path)
    assert out.returncode == 2
    assert [line.split(", got ")[-1] for line in _errors(out.stderr)] == ["'turbo'", "'warp'"]
    assert "2 job(s) failed" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "data.root=/no/such/folder",
            "data.root does not exist: /no/such/folder (set data.root=PATH or FATR_DATA_ROOT)",
        ),
        (
            "model.checkpoint=/no/such/file.pt",
            "checkpoint not found: /no/such/file.pt (set model.checkpoint=PATH or FATR_CHECKPOINT)",
        ),
        ("model.img_size=250", "image size 250 is not divisible by the patch size 16"),
        (
            "bench.scaling.resolutions=[224,250]",
            "bench.scaling.resolutions [250] are not divisible by the patch size 16 of deit_tiny_patch16_224",
        ),
        ("device=mps", "device=mps: the harness measures on the CPU and CUDA only; use auto, cpu, cuda or cuda:N"),
        (
            "bench.latency.compile=turbo",
            "bench.latency.compile must be one of eager, compile, max-autotune, cudagraphs, cpp-wrapper, got 'turbo'",
        ),
    ],
    ids=["images", "weights", "image size", "scaling resolutions", "device", "setting"],
)
def test_what_every_job_shares_is_checked_once_before_the_first(tmp_path, val, override, message):
    """The main command's form, three methods: a missing image folder or checkpoint, an image
    size the patches do not divide, a device the harness cannot time, a bad setting (only
    ``method`` swept, so every job would read the same value): one line, not three failed jobs
    and their list."""
    out = run_cli(["method=fatr,tome,evit", f"data.root={val}", *FAST, override], tmp_path)
    assert out.returncode == 2 and out.stdout == "", out.stderr[-2000:]
    assert out.stderr == f"error: {message}\n"
    assert not (tmp_path / "results").exists()


def test_a_job_that_fails_after_the_baseline_was_measured_records_nothing(tmp_path, val, monkeypatch):
    import dataclasses

    import bench.job

    bench.job._BASELINES.clear()
    results = tmp_path / "results"
    args = ["method=tome", f"data.root={val}", f"results_dir={results}", *FAST, *ACCURACY_ONLY]
    calls = []

    def fails_once(section, subject, out):  # the reduced model's accuracy fails the first time
        measure_accuracy(section, subject, out)
        if subject.reduced:
            calls.append(1)
            if len(calls) == 1:
                raise BenchError("a measurement failed")

    measure_accuracy = next(m.run for m in MEASUREMENTS if m.phase == "accuracy")
    measurements = [dataclasses.replace(m, run=fails_once) if m.phase == "accuracy" else m for m in MEASUREMENTS]
    monkeypatch.setattr(bench.job, "MEASUREMENTS", measurements)
    with pytest.raises(BenchError, match="a measurement failed"):
        run_job(compose(args))
    assert read_records(results) == [], "the unreduced record must wait for the job to finish"
    run_job(compose(args))  # the same process: the cached unreduced measurement is recorded now
    assert [r["method"] for r in read_records(results)] == ["none", "tome"]


# -- 2. two sweeps started together get separate sweep folders --------------------------------


def _sweep(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "FATR_RESULTS_DIR": str(cwd / "results")}
    return subprocess.Popen(
        [sys.executable, "-m", "bench.run", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def test_concurrent_sweeps_do_not_share_a_sweep_folder(tmp_path, val):
    """Hydra's default folder is a timestamp to the second: the second sweep used to list the
    first one's failure and exit 2. Both start here at once, with the default sweep folder."""
    ok = _sweep(["method=tome", f"data.root={val}", *FAST, *ACCURACY_ONLY], tmp_path)
    # a swept budget fails in each job (one method at one budget would be refused before any job)
    bad = _sweep(["method=evit", f"data.root={val}", *FAST, "budget.macs_ratio=0.01,0.02"], tmp_path)
    out_ok, err_ok = (s.decode() for s in ok.communicate(timeout=600))
    _, err_bad = (s.decode() for s in bad.communicate(timeout=600))
    assert ok.returncode == 0, err_ok[-2000:]
    assert "failed" not in err_ok and "evit" not in out_ok
    assert bad.returncode == 2 and "2 job(s) failed" in err_bad and "tome" not in err_bad
    folders = sorted((tmp_path / "outputs" / "multirun").iterdir())
    assert len(folders) == 2 and all((f / "multirun.yaml").exists() for f in folders)
    sweep_dirs = {r["sweep_dir"] for r in read_records(tmp_path / "results")}
    assert sweep_dirs == {str(folders[0])} or sweep_dirs == {str(folders[1])}
    assert all(Path(d).is_absolute() for d in sweep_dirs)


def test_the_sweep_folder_id_is_unique_per_process():
    code = "import bench.sweep_id as s; print(s.run_id())"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ids = {subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout for _ in "ab"}
    assert len(ids) == 2
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import bench.sweep_id

    with initialize_config_dir(config_dir=str(REPO / "bench" / "conf"), version_base="1.3"):
        cfg = hydra_compose("config", return_hydra_config=True)
        assert str(cfg.hydra.sweep.dir).endswith("_" + bench.sweep_id.run_id())


# -- 3. failures decide the exit status; malformed records are skipped ------------------------


def _record(method: str, ts: str, top1, **extra) -> dict:
    config = {"method": {"name": method}, "model": {}, "data": {}, "budget": {"macs_ratio": 0.5}, "device": "cpu"}
    return {
        "config_hash": f"h-{method}-{ts}",
        "method": method,
        "timestamp": ts,
        "model": "tiny",
        "data_root": "/d/val",
        "num_images": 6,
        "budget": {"macs_ratio_target": 0.5},
        "config": {**config, **extra.pop("config", {})},
        "metrics": {"top1": top1, "gmacs": 1.0, "macs_ratio": 0.5, "speedup": 1.5, "latency_ms": 3.0},
        **extra,
    }


def test_malformed_records_are_skipped_with_a_warning(tmp_path):
    (tmp_path / "runs.jsonl").write_text('[1, 2, 3]\n{"method": "x"}\n7\n')
    append_record(tmp_path, _record("tome", "2026-01-01", 70.0))
    with pytest.warns(UserWarning) as caught:
        records = read_run_records(tmp_path)
    assert [r["method"] for r in records] == ["tome"]
    text = " ".join(str(w.message) for w in caught)
    assert "runs.jsonl:1 is not a run record (a JSON list); skipped" in text
    assert "runs.jsonl:2 is not a run record (no 'config_hash'); skipped" in text
    assert "runs.jsonl:3 is not a run record (a JSON int); skipped" in text
    with pytest.warns(UserWarning):
        write_leaderboard(tmp_path)
    assert "| tome |" in (tmp_path / "leaderboard.md").read_text()


def test_leaderboard_replaces_all_its_files_or_none(tmp_path, monkeypatch):
    import bench.report.plots

    append_record(tmp_path, _record("tome", "2026-01-01", 70.0))
    write_leaderboard(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert {"leaderboard.md", "leaderboard.csv", "pareto.png", "latency.png"} <= set(before)
    append_record(tmp_path, _record("evit", "2026-01-02", 60.0))

    def broken(*a, **k):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(bench.report.plots, "plot_latency", broken)
    with pytest.raises(RuntimeError, match="plotting failed"):
        write_leaderboard(tmp_path)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != "runs.jsonl"}
    assert after == {k: v for k, v in before.items() if k != "runs.jsonl"}, "nothing may be half-replaced"
    assert not [p for p in tmp_path.iterdir() if p.is_dir()], "no staging folder left behind"


def test_failed_jobs_exit_2_even_when_the_leaderboard_breaks(tmp_path):
    """All jobs fail and runs.jsonl holds lines the leaderboard cannot use: the sweep used to
    exit 0 with a Hydra warning."""
    results = tmp_path / "results"
    results.mkdir()
    (results / "runs.jsonl").write_text('[1, 2, 3]\n{"method": "x"}\n')
    append_record(results, _record("tome", "2026-01-01", 70.0))
    append_record(results, _record("evit", "2026-01-02", "not a number"))  # a record that breaks sorting
    md = results / "leaderboard.md"
    md.write_text("previous leaderboard\n")
    root = image_folder(tmp_path / "val", 2, 1)
    out = run_cli(["method=tome,evit", f"data.root={root}", *FAST, "budget.macs_ratio=0.01"], tmp_path)  # per job
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "2 job(s) failed" in out.stderr
    assert "error: leaderboard not regenerated (TypeError" in out.stderr
    assert f"warning: {results}/runs.jsonl:1 is not a run record (a JSON list); skipped" in out.stderr
    assert out.stderr.count("runs.jsonl:2 is not a run record (no 'config_hash'); skipped") == 1
    assert md.read_text() == "previous leaderboard\n"


# -- 4. rows that can be told apart -----------------------------------------------------------


def test_tome_says_when_r_is_capped():
    info = ModelInfo(depth=12, num_heads=3, embed_dim=192, num_prefix=1, patch_grid=(14, 14))
    for r in (8, 15):
        reducer = build_reducer("tome", r=r)
        reducer.bind(info)
        assert reducer.notes() == []
    reducer = build_reducer("tome", r=200)
    reducer.bind(info)
    assert reducer.notes() == [
        "r capped in 12 of 12 blocks (first: block 0 merges 98 of the 200 asked; a block can merge at most half "
        "its non-prefix tokens)"
    ]


def test_own_knob_runs_show_their_knob_and_a_capped_r_is_flagged(tmp_path, val, capsys):
    results = tmp_path / "results"
    base = [
        "method=tome",
        "budget.macs_ratio=null",
        f"data.root={val}",
        f"results_dir={results}",
        *FAST,
        *ACCURACY_ONLY,
    ]
    for r in (8, 200):
        run_job(compose([*base, f"method.reducer.r={r}"]))
    assert "warning: method tome: r capped in 12 of 12 blocks" in capsys.readouterr().err
    recs = [r for r in read_records(results) if r["method"] == "tome"]
    assert [(r["budget"]["knob"], r["budget"]["knob_value"]) for r in recs] == [("r", 8), ("r", 200)]
    assert recs[0]["notes"] == [] and recs[1]["notes"][0].startswith("r capped")
    write_leaderboard(results)
    md = (results / "leaderboard.md").read_text()
    assert "| tome | – | r=8 |" in md and "| tome | – | r=200 † |" in md
    assert "† tome r=200: r capped in 12 of 12 blocks" in md


def test_records_without_a_stored_knob_show_the_methods_own():
    old = _record("tome", "2026-01-01", 70.0, hparams={"r": 8, "inflection": 0.0, "prop_attn": True})
    old["budget"] = {"macs_ratio_target": None}
    schedule = _record("tome", "2026-01-02", 60.0, hparams={"r": [9, 0, 7]})
    schedule["budget"] = {"macs_ratio_target": None}
    schedule["config"]["budget"] = {"macs_ratio": None, "r": [9, 0, 7]}
    assert sorted(table([old, schedule])["knob"]) == ["r=8", "r=[9,0,7]"]


def test_rows_measured_with_different_bench_settings_say_so():
    def with_latency(method, ts, batch):
        latency = {"batch_size": batch, "iters": 10, "warmup": 2, "amp": False, "threads": None}
        return _record(method, ts, 70.0, config={"bench": {"latency": latency}})

    same = markdown(table([with_latency("none", "1", 32), with_latency("tome", "2", 32)]))
    assert "Latency settings: batch 32, 10 iters after 2 warm-up." in same
    assert "different settings" not in same
    mixed = markdown(table([with_latency("none", "1", 0), with_latency("tome", "2", 32)]))
    assert "**Latency measured with different settings in these rows; compare with care:**" in mixed
    assert "- batch 0, 10 iters after 2 warm-up: none @0.50" in mixed
    assert "- batch 32, 10 iters after 2 warm-up: tome @0.50" in mixed


# -- 5. non-finite weights and outputs --------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_nan_weights_are_refused(tmp_path, suffix):
    state = tiny_vit().state_dict()
    state["blocks.1.mlp.fc1.weight"][0, 0] = float("nan")
    state["head.bias"][3] = float("inf")
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(BenchError, match=r"has NaN or Inf weights in blocks\.1\.mlp\.fc1\.weight \(and 1 more"):
        load_checkpoint(tiny_vit(), path)


def test_nan_outputs_are_refused_in_accuracy_and_latency():
    model = tiny_vit()
    with torch.no_grad():
        model.head.bias[2] = float("nan")
    x = torch.randn(4, 3, 32, 32)
    with pytest.raises(BenchError, match=r"tome, images 0\.\.1: the model produced NaN or Inf outputs"):
        predict(model, x, 2, "cpu", "tome", show_progress=False)
    with pytest.raises(BenchError, match="latency: the model produced NaN or Inf"):
        measure_latency(model, tiny_vit(), x, warmup=0, iters=1, show_progress=False)
    with pytest.raises(BenchError, match="latency warm-up: the model produced NaN or Inf"):
        measure_latency(model, tiny_vit(), x, warmup=1, iters=1, show_progress=False)


# -- 6. 16-bit PNGs ---------------------------------------------------------------------------


def test_16_bit_png_is_scaled_not_clipped_to_white(tmp_path):
    gray = ((np.arange(48 * 40).reshape(40, 48) * 7) % 256).astype(np.uint8)
    wnid = synsets()[5]
    for name, array in (("eight", gray), ("sixteen", gray.astype(np.uint16) * 257)):
        (tmp_path / name / wnid).mkdir(parents=True)
        Image.fromarray(array).save(tmp_path / name / wnid / "a.png")
    with Image.open(tmp_path / "sixteen" / wnid / "a.png") as im:
        assert im.mode == "I;16"
        assert np.asarray(to_rgb(im))[..., 0].tolist() == gray.tolist()
    eight = load_imagenet_folder(tmp_path / "eight", "deit_tiny_patch16_224", show_progress=False)
    sixteen = load_imagenet_folder(tmp_path / "sixteen", "deit_tiny_patch16_224", show_progress=False)
    assert torch.equal(eight.images, sixteen.images)


def test_float_images_are_refused_by_name():
    with pytest.raises(BenchError, match=r"cannot read image x\.tif: floating-point images \(PIL mode F\)"):
        to_rgb(Image.new("F", (4, 4)), "x.tif")


# -- 7. unreadable checkpoints ----------------------------------------------------------------


def _checkpoints(tmp: Path) -> dict[str, tuple[Path, str]]:
    from safetensors.torch import save_file

    state = {"w": torch.randn(64, 64)}
    save_file(state, str(tmp / "ok.safetensors"))
    torch.save(state, tmp / "ok.pth")
    torch.save({"w": Path("a python object")}, tmp / "object.pth")
    cases = {
        "truncated safetensors": ("ok.safetensors", "not a complete safetensors file"),
        "garbage safetensors": (None, "not a complete safetensors file"),
        "truncated pth": ("ok.pth", "truncated or corrupt torch file"),
        "garbage pth": (None, "not a torch checkpoint"),
        "object pth": ("object.pth", "holds Python objects besides tensors"),
        "empty pth": (b"", "the file is empty"),
    }
    out = {}
    for i, (case, (source, reason)) in enumerate(cases.items()):
        path = tmp / f"{i}{'.safetensors' if 'safetensors' in case else '.pth'}"
        if source is None:
            path.write_bytes(b"not weights at all\n" * 20)
        elif isinstance(source, bytes):
            path.write_bytes(source)
        elif case.startswith("truncated"):
            data = (tmp / source).read_bytes()
            path.write_bytes(data[: len(data) // 2])
        else:
            path = tmp / source
        out[case] = (path, reason)
    return out


@pytest.mark.parametrize(
    "case",
    ["truncated safetensors", "garbage safetensors", "truncated pth", "garbage pth", "object pth", "empty pth"],
)
def test_unreadable_checkpoints_are_one_line_naming_the_file(tmp_path, case):
    path, reason = _checkpoints(tmp_path)[case]
    with pytest.raises(BenchError) as e:
        read_state_dict(path)
    message = str(e.value)
    assert "\n" not in message and len(message) < 300
    assert message.startswith(f"cannot read checkpoint {path}: ") and reason in message


# -- 8. a read-only results folder stops the sweep before any job -----------------------------


def _read_only_folder(tmp: Path) -> Path:
    if os.geteuid() != 0:
        folder = tmp / "ro"
        folder.mkdir()
        (folder / "runs.jsonl").write_text("")
        folder.chmod(0o555)
        return folder
    # Root ignores permission bits; sysfs refuses new files even to root.
    try:
        with tempfile.TemporaryFile(dir="/sys/fs"):
            pass
    except OSError:
        return Path("/sys/fs")
    pytest.skip("running as root and no read-only folder (/sys/fs) to provoke the error with")


def test_read_only_results_dir_fails_before_any_job(tmp_path, val):
    ro = _read_only_folder(tmp_path)
    try:
        with pytest.raises(BenchError, match=r"is not writable"):
            check_writable(ro)
        out = run_cli(["method=tome", f"data.root={val}", f"results_dir={ro}", "resume=true", *FAST], tmp_path)
    finally:
        if ro.parent == tmp_path:
            ro.chmod(0o755)
    assert out.returncode == 2, out.stderr[-2000:]
    assert _errors(out.stderr) == [
        f"error: results_dir {ro} is not writable (Permission denied); set results_dir=PATH or FATR_RESULTS_DIR"
    ]
    assert "[skip]" not in out.stdout and "Traceback" not in out.stderr


def test_results_dir_below_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(BenchError, match=r"cannot be created: .*/file is a file, not a folder"):
        check_writable(tmp_path / "file" / "results")
    check_writable(tmp_path / "new" / "results")  # a folder that can be created is fine
    assert not (tmp_path / "new").exists(), "checking must not create it"


# -- 9. Ctrl-C mid-sweep ----------------------------------------------------------------------


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_mid_sweep_is_one_line_exit_130_and_keeps_what_finished(tmp_path, val):
    results = tmp_path / "results"
    fast = [a for a in FAST if not a.startswith("bench.latency.iters")]
    # The second job times 100000 iterations: it is still running when the interrupt comes.
    args = ["method=tome", "bench.latency.iters=2,100000", f"data.root={val}", *fast, *QUICK]
    env = {**os.environ, "FATR_RESULTS_DIR": str(results)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.run", *args, f"hydra.sweep.dir={tmp_path}/sweep"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell without job control starts background commands (``.ci/run &``, nohup) with
        # SIGINT ignored, and a child inherits that: Python then never raises KeyboardInterrupt
        # and the sweep runs on. A terminal's Ctrl-C arrives at a default handler, so give it one.
        preexec_fn=_default_sigint,
    )
    try:
        deadline = time.monotonic() + 300
        while len(read_records(results)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        time.sleep(1.0)  # into the second job
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert lines == [
        f"interrupted: 1 of 2 job(s) finished (0_tome), recorded in {results}, leaderboard regenerated; "
        "rerun the same command with resume=true to run the rest"
    ]
    assert [r["method"] for r in read_records(results)] == ["none", "tome"]
    assert "| tome |" in (results / "leaderboard.md").read_text()


# -- smaller: resume ----------------------------------------------------------------------------


def test_resume_neither_remeasures_nor_reappends_the_unreduced_record_and_lists_skipped_jobs(tmp_path, val):
    args = [f"data.root={val}", *FAST, *QUICK, "bench.latency.enabled=false"]
    first = run_cli(["method=tome", *args], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    out = run_cli(["method=tome,evit", "resume=true", *args], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [r["method"] for r in read_records(tmp_path / "results")] == ["none", "tome", "evit"]
    assert "1 job(s) skipped, already recorded (resume):" in out.stdout
    assert "0_tome: tome: already recorded" in out.stdout
    evit = read_records(tmp_path / "results")[-1]["metrics"]
    stored_base = read_records(tmp_path / "results")[0]["metrics"]
    assert evit["baseline_top1"] == stored_base["top1"] and evit["baseline_gmacs"] == stored_base["gmacs"]
    assert json.dumps(evit)  # a complete record


def test_interrupt_gives_up_on_a_leaderboard_that_takes_too_long(tmp_path, monkeypatch, capsys):
    """Ctrl-C must always end: a leaderboard step that hangs is abandoned after the time limit
    and the one line still says what was recorded."""
    import bench.callbacks as callbacks
    import bench.leaderboard as leaderboard

    sweep = callbacks.SweepSummary()
    sweep.results_dir = str(tmp_path)
    monkeypatch.setattr(sweep, "marked", lambda name: [("0_tome", "")])
    monkeypatch.setattr(callbacks, "_ACTIVE", sweep)
    monkeypatch.setattr(callbacks, "INTERRUPT_LEADERBOARD_SECONDS", 1)
    monkeypatch.setattr(leaderboard, "write_leaderboard", lambda *a, **k: time.sleep(30))
    t0 = time.monotonic()
    assert callbacks.report_interrupt() == 130
    assert time.monotonic() - t0 < 10
    err = capsys.readouterr().err
    assert f"recorded in {tmp_path} (leaderboard not regenerated)" in err


def test_leaderboard_command_refuses_a_folder_without_runs_and_writes_nothing(tmp_path, capsys):
    from bench.leaderboard import main

    missing = tmp_path / "typo"
    assert main([str(missing)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: no runs recorded in {missing / 'runs.jsonl'}; name a results folder that bench.run wrote to"
    )
    assert not missing.exists()
    record = {"config_hash": "x", "method": "tome", "timestamp": "2026-01-01", "metrics": {"top1": 70.0}}
    append_record(tmp_path / "ok", record)
    assert main([str(tmp_path / "ok")]) == 0
    assert (tmp_path / "ok" / "leaderboard.md").is_file()
