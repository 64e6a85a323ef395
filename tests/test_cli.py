"""The entry point as a user runs it: sweeps, launchers, plug-in reducers and bad input."""

from __future__ import annotations

import pytest
from bench_utils import FAST, image_folder, run_cli
from helpers import doc_blocks

from bench.store import read_records


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("data") / "val")


def test_comma_list_sweeps_without_dash_m(tmp_path, val):
    out = run_cli(["method=tome,evit", f"data.root={val}", *FAST], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    records = read_records(tmp_path / "results")
    assert [r["method"] for r in records] == ["none", "tome", "evit"]
    assert "top-1 %" in out.stdout and "tome" in out.stdout  # the summary table
    assert "where the time went (seconds):" in out.stdout and "sweep took" in out.stdout
    for name in ("leaderboard.md", "leaderboard.csv", "pareto.png", "latency.png"):
        assert (tmp_path / "results" / name).exists(), name


def test_unknown_method_lists_the_method_configs(tmp_path):
    out = run_cli(["method=nope"], tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().startswith("error: method=nope: no such method; choose one of ")
    assert "tome" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_help_says_what_the_command_does_before_the_config(tmp_path):
    out = run_cli(["--help"], tmp_path)
    assert out.returncode == 0 and "Traceback" not in out.stderr
    head = out.stdout.split("== Configuration groups ==")[0]
    assert head.startswith("python -m bench.run: every method at a matched MACs budget")
    assert "python -m bench.run method=fatr,tome,evit" in head and "docs/running.md" in head
    assert "method: ats, dct, diffrate" in out.stdout  # Hydra's own lists follow


def test_finetune_help_says_what_the_command_does(tmp_path):
    out = run_cli(["--help"], tmp_path, module="bench.finetune")
    assert out.returncode == 0 and "Traceback" not in out.stderr
    assert out.stdout.startswith("python -m bench.finetune: fine-tune each method at the budget")
    assert "docs/finetuning.md" in out.stdout


def test_bad_data_root_is_one_line(tmp_path):
    out = run_cli(["method=tome", "data.root=/nonexistent/val", *FAST], tmp_path)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: data.root does not exist: /nonexistent/val (set data.root=PATH or FATR_DATA_ROOT)"]
    assert "Traceback" not in out.stderr


def test_user_reducer_from_its_own_yaml(tmp_path, val):
    """docs/adding-a-reducer.md's example as a user copies it: its class and its yaml, outside the
    project, found through hydra.searchpath, FLOPs measurement included (its token_counts passes
    the forward check). Read from the page, so the page cannot drift from what is tested."""
    (code,) = doc_blocks("python")
    (yaml,) = doc_blocks("yaml")
    assert code.startswith("# my_reducers.py") and yaml.startswith("# my_conf/method/every_other.yaml")
    (tmp_path / "my_reducers.py").write_text(code)
    conf = tmp_path / "conf" / "method"
    conf.mkdir(parents=True)
    (conf / "every_other.yaml").write_text(yaml)
    args = [
        "method=every_other",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        "budget.macs_ratio=null",
        "bench.scaling.enabled=false",
        f"data.root={val}",
        *FAST,
    ]
    out = run_cli(args, tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    rec = read_records(tmp_path / "results")[-1]
    assert rec["method"] == "every_other" and rec["hparams"] == {"block": 4}
    assert rec["metrics"]["gmacs_analytic"] < rec["metrics"]["baseline_gmacs"]  # its counts were used


@pytest.mark.parametrize(
    "launcher",
    [
        ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20"],  # the path SLURM sweeps take
        ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],  # parallel local processes
    ],
    ids=["submitit_local", "joblib"],
)
def test_hydra_launchers_run_a_two_method_sweep(tmp_path, val, launcher):
    """Each job in a process of its own: what is checked is that every record arrives whole,
    so the jobs measure accuracy and FLOPs only (timing is tested with the basic launcher)."""
    args = [
        "method=tome,evit",
        *launcher,
        "bench.scaling.enabled=false",
        "bench.spectral.enabled=false",
        f"data.root={val}",
        *FAST,
        "budget.macs_ratio=null",  # the default knobs: no budget solve in each job
        "bench.latency.enabled=false",
    ]
    out = run_cli(args, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    methods = sorted({r["method"] for r in read_records(tmp_path / "results")})
    assert methods == ["evit", "none", "tome"]
    assert all(line.endswith("}") for line in (tmp_path / "results" / "runs.jsonl").read_text().splitlines())
    assert (tmp_path / "results" / "leaderboard.md").exists()


@pytest.mark.parametrize(
    "method,override,message",
    [
        ("evit", "budget.macs_ratio=0.05", "budget macs_ratio=0.05 is impossible for method evit"),
        ("evit", "method.reducer.blocks=[3,9,16]", "reduction block index 16 is outside the model's depth"),
        ("evit", "method.reducer.keep_rate=0.5", "method.reducer.keep_rate=0.5 was set explicitly"),
        ("fatr", "method.reducer.omega_path=/nonexistent/omega.pt", "FATR omega file not found"),  # patched on meta
    ],
)
def test_a_bad_reducer_setting_of_a_single_run_is_refused_before_the_job(tmp_path, val, method, override, message):
    """One method at one budget: the reducer is built, its budget solved and patched into the
    weightless model before the job, so what the job would refuse is one error line and status
    2, with no job launched and no results folder."""
    out = run_cli([f"method={method}", override, f"data.root={val}", *FAST], tmp_path)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and message in errors[0], out.stderr[-2000:]
    assert "Launching" not in out.stdout + out.stderr and "Warning" not in out.stderr
    assert "job(s) failed" not in out.stderr and not (tmp_path / "results").exists()


def test_an_impossible_budget_fails_one_job_not_the_sweep(tmp_path, val):
    args = [
        "method=evit",
        "budget.macs_ratio=0.05,0.7",
        "bench.scaling.enabled=false",
        "bench.spectral.enabled=false",
        "bench.latency.enabled=false",
        f"data.root={val}",
        *FAST,
    ]
    out = run_cli(args, tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "error: budget macs_ratio=0.05 is impossible for method evit" in out.stderr
    assert "1 job(s) failed" in out.stderr
    budgets = [r["budget"]["macs_ratio_target"] for r in read_records(tmp_path / "results") if r["method"] == "evit"]
    assert budgets == [0.7], "the job after the failing one must still run"
