"""The GPU-lease kit (``python -m bench.gpu_session``): what it runs there, in which order, cut
off at the deadline with what finished kept, and how the records come back into the speed table.
The GPU itself is not needed: the steps are rehearsed with stand-in commands."""

from __future__ import annotations

import json
import os
import sys
import tarfile
import time
from pathlib import Path

import pytest
from bench_utils import compose

import bench.leaderboard
from bench import gpu_session, kernel_profile
from bench.gpu_session import (
    ALL_METHODS,
    DATASET,
    KIT,
    RESULTS_DIR,
    SPEED_ONLY,
    STEPS,
    Step,
    merge,
    run,
    run_until,
    step_command,
)
from bench.store import git_commit


@pytest.fixture
def kit(tmp_path, monkeypatch):
    """A working directory with an (empty) .gpu kit, the wheels' install a no-op and the probe
    a print: importing torch would eat a short test deadline."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / KIT / "wheels").mkdir(parents=True)
    (tmp_path / KIT / DATASET).mkdir()
    (tmp_path / KIT / "commit").write_text("abc123\n")
    monkeypatch.setattr(gpu_session, "install_wheels", lambda wheels, target: None)
    monkeypatch.setattr(gpu_session, "PROBE", "print('probe')")
    # the session's fixed /tmp paths, private to this test (tests run in parallel)
    for name in ("RESULTS_DIR", "LOG_PATH", "SITE_DIR", "WARM_DIR", "CACHE_DIR"):
        monkeypatch.setattr(gpu_session, name, tmp_path / "session" / name.lower())
    return tmp_path


def _first_values(overrides: list[str]) -> list[str]:
    """One job's overrides of a sweep: the first value of each comma list (not inside brackets)."""
    out = []
    for o in overrides:
        key, value = o.split("=", 1)
        out.append(f"{key}={value if '[' in value else value.split(',')[0]}")
    return out


def test_the_tests_and_the_issue_targets_come_first_and_every_sweep_composes():
    names = [s.name for s in STEPS]
    assert names[:5] == [
        "cuda-tests",
        "cuda-inductor",
        "small-base-fp32-eager",
        "tiny-bf16-eager",
        "tiny-bf16-cudagraphs",
    ]
    assert len(set(names)) == len(names)
    for step in STEPS:
        cmd = step_command(step, Path("/tmp/r"), KIT / DATASET)
        if step.name == "profile":  # its arguments are ones bench.kernel_profile accepts
            assert cmd[1:3] == ["-m", "bench.kernel_profile"]
            args = kernel_profile.parser().parse_args(cmd[3:])
            assert args.out.parent == RESULTS_DIR and set(args.methods.split(",")) == {"none", *ALL_METHODS.split(",")}
            continue
        if step.name == "profile-compiled":  # compiled as the CUDA-graphs sweep compiles, without the graphs
            assert cmd[1:3] == ["-m", "bench.kernel_profile"]
            args = kernel_profile.parser().parse_args(cmd[3:])
            assert args.out.parent == RESULTS_DIR and args.compile == "compile" and args.amp and args.batch == 256
            assert args.methods.split(",")[0] == "none"
            continue
        if not step.sweep:
            assert cmd[1:4] == ["-m", "pytest", "tests/test_compile.py"]
            continue
        assert cmd[:3] == [sys.executable, "-m", "bench.run"]
        overrides = cmd[3:]
        assert "device=cuda" in overrides and f"data.root={KIT / DATASET}" in overrides
        assert not Path(str(KIT / DATASET)).is_absolute()  # a row's identity: not where the tree was copied
        cfg = compose(_first_values(overrides))  # every key exists in the config schema
        assert cfg.model.random_init and not cfg.bench.accuracy


def test_extra_overrides_replace_those_of_the_same_key():
    step = Step("s", "why", ("bench.run", "method=a,b", "model=deit_tiny", "bench.latency.batch_size=[256]"))
    cmd = step_command(step, Path("out"), Path(".gpu/x"), device="cpu", extra=["method=evit", "seed=3"])
    overrides = cmd[3:]
    assert overrides.count("method=evit") == 1 and not any(o.startswith("method=a") for o in overrides)
    assert "device=cpu" in overrides and "device=cuda" not in overrides
    assert "seed=3" in overrides and "results_dir=out" in overrides
    assert all(o in overrides for o in SPEED_ONLY)


def test_a_step_past_the_deadline_is_interrupted(tmp_path):
    start = time.monotonic()
    with (tmp_path / "log").open("w") as log:
        what = run_until([sys.executable, "-c", "import time; time.sleep(60)"], 2.0, log, dict(os.environ), grace=2.0)
    assert what == "cut off after 2 s" and time.monotonic() - start < 10


def test_run_keeps_what_finished_and_says_what_was_cut_or_skipped(kit, tmp_path, monkeypatch, capsys):
    quick = Step("quick", "finishes", ("timeit", "-n1", "-r1", "pass"), sweep=False)
    slow = Step("slow", "cut off", ("timeit", "-n1", "-r1", "import time; time.sleep(60)"), sweep=False)
    late = Step("late", "no time left", ("timeit", "pass"), sweep=False)
    monkeypatch.setattr(gpu_session, "STEPS", (quick, slow, late))
    out = tmp_path / "out"
    assert run(deadline_s=6.0, out=out, reserve_s=0.0, min_step_s=1.0) == 1
    said = capsys.readouterr().out
    assert "quick: exit 0" in said and "slow: cut off" in said and "late: skipped" in said
    log = (out / "gpu-session.log").read_text()
    assert "== quick: finishes" in log and "== late: skipped" in log


def test_run_takes_the_named_steps_in_the_order_named(kit, tmp_path, monkeypatch, capsys):
    first, second = (Step(n, n, ("timeit", "-n1", "-r1", "pass"), sweep=False) for n in ("first", "second"))
    monkeypatch.setattr(gpu_session, "STEPS", (first, second))
    assert run(deadline_s=60.0, out=tmp_path / "out", steps=["second", "first"], reserve_s=0.0) == 0
    said = capsys.readouterr().out
    assert said.index("second: exit 0") < said.index("first: exit 0")


def test_run_brings_back_the_tracebacks_its_jobs_saved(kit, tmp_path, monkeypatch):
    """A failed compile's one line says what; the traceback the job saved says where, and the
    machine is gone after the call. Older ones (an earlier call's) stay behind."""
    old = tmp_path / "outputs" / "multirun" / "earlier" / "0_pool" / "compile-traceback.txt"
    old.parent.mkdir(parents=True)
    old.write_text("old")
    os.utime(old, (1.0, 1.0))
    job = tmp_path / "outputs" / "multirun" / "sweep" / "2_kmedoids"
    code = f"import pathlib; pathlib.Path({str(job)!r}).mkdir(parents=True); "
    code += f"pathlib.Path({str(job / 'compile-traceback.txt')!r}).write_text('Traceback: lowering')"
    failing = Step("failing", "saves a traceback", ("-c", code), sweep=False)
    monkeypatch.setattr(gpu_session, "STEPS", (failing,))
    monkeypatch.setattr(gpu_session, "step_command", lambda step, *a, **k: [sys.executable, *step.args])
    out = tmp_path / "out"
    assert run(deadline_s=60.0, out=out, reserve_s=0.0) == 0
    assert [p.name for p in (out / "tracebacks").iterdir()] == ["sweep-2_kmedoids-compile-traceback.txt"]
    assert (out / "tracebacks" / "sweep-2_kmedoids-compile-traceback.txt").read_text() == "Traceback: lowering"


def test_run_refuses_an_unknown_step_or_a_missing_kit(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run(10, tmp_path / "out", steps=["tiny-bf16-cudagraphs", "nope"]) == 2
    assert "unknown step(s) ['nope']" in capsys.readouterr().err
    assert run(60, tmp_path / "out") == 2
    assert "no .gpu kit here" in capsys.readouterr().err
    for deadline in (-5, 0, 40):
        assert run(deadline, tmp_path / "out") == 2
        assert capsys.readouterr().err.startswith(f"error: --deadline-s {deadline} leaves no step")
    assert run(60, tmp_path / "out", warm_jobs=-1) == 2
    assert capsys.readouterr().err == "error: --warm -1: give how many methods compile at a time (1 or more)\n"
    assert not (tmp_path / "out").exists()


def test_merge_adds_each_record_once_and_refuses_a_missing_file(tmp_path, monkeypatch, capsys):
    written = []
    monkeypatch.setattr(bench.leaderboard, "write_leaderboard", lambda d: written.append(d) or [])
    returned = tmp_path / "runs.jsonl"
    records = [{"config_hash": h, "timestamp": t, "method": "a"} for h, t in (("x", "1"), ("y", "1"), ("x", "2"))]
    returned.write_text("".join(json.dumps(r) + "\n" for r in records))
    store = tmp_path / "speed"
    store.mkdir()
    (store / "runs.jsonl").write_text(json.dumps(records[0]) + "\n")
    assert merge(returned, store) == 0
    assert merge(returned, store) == 0
    lines = (store / "runs.jsonl").read_text().splitlines()
    assert [(json.loads(x)["config_hash"], json.loads(x)["timestamp"]) for x in lines] == [
        ("x", "1"),
        ("y", "1"),
        ("x", "2"),
    ]
    assert "2 of 3 records added" in capsys.readouterr().out and written == [store, store]
    (tmp_path / "profile-x.txt").write_text("# Operator profile\n")  # a report that came back with the store
    assert merge(returned, store) == 0
    assert (store / "profiles" / "profile-x.txt").read_text() == "# Operator profile\n"
    assert merge(tmp_path / "missing.jsonl", store) == 2
    assert "no run store at" in capsys.readouterr().err


def test_the_commit_of_a_tree_copied_without_git_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("FATR_GIT_COMMIT", "0123456789ab-dirty")
    assert git_commit() == "0123456789ab-dirty"


def test_a_compiled_sweep_is_warmed_one_method_per_process_and_an_eager_one_is_not(tmp_path):
    by_name = {s.name: s for s in STEPS}
    data = KIT / DATASET
    assert gpu_session.warm_commands(by_name["tiny-bf16-eager"], data) == []
    assert gpu_session.warm_commands(by_name["cuda-tests"], data) == []
    cmds = gpu_session.warm_commands(by_name["tiny-fp32"], data, warm_dir=tmp_path, extra=["method=evit,pool"])
    assert [c[3:][[o.split("=")[0] for o in c[3:]].index("method")] for c in cmds] == ["method=evit", "method=pool"]
    for cmd, method in zip(cmds, ("evit", "pool"), strict=True):
        overrides = cmd[3:]
        assert "bench.latency.compile=cudagraphs" in overrides  # the step's eager half needs no warming
        assert f"results_dir={tmp_path / method}" in overrides  # a scratch store, never the session's
        assert all(o in overrides for o in gpu_session.WARM_ONLY)
        assert "bench.latency.batch_size=[1,256]" in overrides and "model=deit_tiny" in overrides
        compose(_first_values(overrides))  # every key exists


def test_parallel_jobs_run_at_most_n_at_a_time_and_are_cut_off_at_the_deadline(tmp_path):
    stamp = "import time,sys; open(sys.argv[1], 'w').write(str(time.monotonic())); time.sleep(float(sys.argv[2]))"
    cmds = [[sys.executable, "-c", stamp, str(tmp_path / f"{i}.t"), "1"] for i in range(3)]
    ok, n = gpu_session.run_parallel(cmds, 30.0, tmp_path / "logs", dict(os.environ), jobs=2)
    assert (ok, n) == (3, 3)
    starts = sorted(float((tmp_path / f"{i}.t").read_text()) for i in range(3))
    assert starts[2] - starts[0] > 0.9  # the third waited for a free slot
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["0.log", "1.log", "2.log"]
    begin = time.monotonic()
    slow = [[sys.executable, "-c", stamp, str(tmp_path / "s.t"), "60"], [sys.executable, "-c", "pass"]]
    assert gpu_session.run_parallel(slow, 3.0, tmp_path / "logs2", dict(os.environ), jobs=2, grace=2.0) == (1, 2)
    assert time.monotonic() - begin < 15


def test_run_warms_a_compiled_step_before_timing_it_only_when_told_to(kit, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_session, "WARM_DIR", tmp_path / "warm")
    step = Step("compiled", "stand-in", ("timeit", "-n1", "-r1", "pass"), sweep=False)
    monkeypatch.setattr(gpu_session, "STEPS", (step,))
    monkeypatch.setattr(gpu_session, "warm_commands", lambda *a, **k: [[sys.executable, "-c", "pass"]] * 2)
    assert run(deadline_s=60.0, out=tmp_path / "out", reserve_s=0.0, warm_jobs=1) == 0
    said = capsys.readouterr().out
    assert said.index("compiled: warmed: 2 of 2 methods compiled") < said.index("compiled: exit 0")
    assert "(1 at a time)" in said
    log = (tmp_path / "out" / "gpu-session.log").read_text()
    assert "warmed: 2 of 2" in log and "warm-up 1: $ " in log  # each job's last lines come back
    assert run(deadline_s=60.0, out=tmp_path / "out", reserve_s=0.0) == 0
    assert "warmed" not in capsys.readouterr().out


def test_the_compile_cache_goes_out_with_the_records_and_comes_back_for_the_next_lease(
    kit, tmp_path, monkeypatch, capsys
):
    """run unpacks the kit's archive into inductor's cache before the first step, points every
    step at it, packs it into --out after a step that changed it (not after one that did not);
    merge keeps the returned archive in the kit."""
    cache = gpu_session.CACHE_DIR
    seed = tmp_path / "seed"
    (seed / "fxgraph" / "ab").mkdir(parents=True)
    (seed / "fxgraph" / "ab" / "graph").write_text("from the last lease")
    gpu_session.pack_cache(seed, kit / KIT / gpu_session.CACHE_ARCHIVE, 15)
    compiles = (
        "import os, pathlib; d = pathlib.Path(os.environ['TORCHINDUCTOR_CACHE_DIR']);"
        f" assert d == pathlib.Path({str(cache)!r}), d;"
        " assert (d / 'fxgraph' / 'ab' / 'graph').read_text() == 'from the last lease';"
        " (d / 'triton' / '0' / 'k').mkdir(parents=True); (d / 'triton' / '0' / 'k' / 'kernel.cubin').write_text('new')"
    )
    compiled = Step("compiled", "compiles", ("timeit", "-n1", "-r1", compiles), sweep=False)
    loads_only = Step("loads", "compiles nothing", ("timeit", "-n1", "-r1", "pass"), sweep=False)
    monkeypatch.setattr(gpu_session, "STEPS", (compiled, loads_only))
    out = tmp_path / "out"
    assert run(deadline_s=120.0, out=out, reserve_s=0.0) == 0
    said = capsys.readouterr().out
    assert "compile cache: 1 file from the last lease" in said
    assert said.count("compile cache: 2 of 2 entries packed for the next lease") == 1  # the second step changed nothing
    with tarfile.open(out / gpu_session.CACHE_ARCHIVE) as tar:
        assert sorted(tar.getnames()) == ["fxgraph/ab/graph", "triton/0/k/kernel.cubin"]

    monkeypatch.setattr(bench.leaderboard, "write_leaderboard", lambda d: [])
    (out / "runs.jsonl").write_text("")
    assert merge(out / "runs.jsonl", tmp_path / "speed", kit=tmp_path / "next-kit") == 0
    kept = tmp_path / "next-kit" / gpu_session.CACHE_ARCHIVE
    assert kept.read_bytes() == (out / gpu_session.CACHE_ARCHIVE).read_bytes()
    assert "the compile cache, kept for the next lease" in capsys.readouterr().out


def test_prepare_carries_the_last_archive_only_where_it_fits_and_run_packs_within_the_room_left(tmp_path):
    kit = tmp_path / "kit"
    kit.mkdir()
    archive = b"x" * 2**20
    assert gpu_session.keep_archive(kit, None, 5.0).startswith("no compile cache from an earlier lease")
    assert gpu_session.keep_archive(kit, archive, 0.5).endswith("is left out: 0.5 MiB left to carry")
    assert not (kit / gpu_session.CACHE_ARCHIVE).exists()
    assert gpu_session.keep_archive(kit, archive, 5.0).endswith("(1.0 MiB) travels too")
    assert (kit / gpu_session.CACHE_ARCHIVE).read_bytes() == archive
    assert gpu_session.archive_limit(kit) == gpu_session.ARCHIVE_LIMIT_MIB  # no room file: the file limit
    (kit / gpu_session.CACHE_ROOM).write_text("11.5\n")
    assert gpu_session.archive_limit(kit) == 11.5
    (kit / gpu_session.CACHE_ROOM).write_text("40\n")
    assert gpu_session.archive_limit(kit) == gpu_session.ARCHIVE_LIMIT_MIB
