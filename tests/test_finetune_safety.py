"""``bench.finetune`` is safe to try and to stop: its records go to ``results/local`` (never the
published ``results/``), Ctrl-C is one line with the command that continues and status 130,
a checkpoint that cannot be resumed is one line naming it and what to do, and a save that fails
(disk full) keeps the last good ``last.pt``."""

from __future__ import annotations

import copy
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from bench_utils import REPO, compose, image_folder
from conftest import tiny_vit
from test_finetune import CLI_FAST, TINY_RECIPE, FixedImages, compose_finetune

import bench.train.trainer as trainer_module
from bench.errors import BenchError
from bench.finetune import resume_command
from bench.train.trainer import LAST, METRICS, Recipe, finish_before_interrupt, read_metrics, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- 1. user runs never write into the published results/ ------------------------------------------


def test_finetune_writes_where_bench_run_does_not_into_published_results(monkeypatch):
    monkeypatch.delenv("FATR_RESULTS_DIR", raising=False)
    assert compose_finetune([]).results_dir == compose([]).results_dir == "results/local"
    assert compose_finetune(["results_dir=results"]).results_dir == "results"  # publishing: on purpose
    monkeypatch.setenv("FATR_RESULTS_DIR", "/elsewhere")
    assert compose_finetune([]).results_dir == "/elsewhere"


# -- 2. Ctrl-C: one line with the command that continues, status 130 --------------------------------


def test_resume_command_is_the_same_command_with_resume_true():
    argv = ["method=fatr,tome", "resume=false", "data.train_root=/my images", "+resume=1"]
    assert resume_command(argv, env={}) == (
        "python -m bench.finetune method=fatr,tome 'data.train_root=/my images' resume=true"
    )
    torchrun = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    assert (
        resume_command(["method=none"], torchrun)
        == "torchrun --nproc_per_node 2 -m bench.finetune method=none resume=true"
    )


def test_ctrl_c_during_an_update_lands_after_it():
    """An update cut halfway (optimizer stepped, EMA not) could be neither saved nor resumed."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    finished = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with finish_before_interrupt():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                finished.append(True)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert finished == [True]


def _default_sigint() -> None:
    # A shell without job control starts background commands with SIGINT ignored, and a child
    # inherits that (Python then never raises KeyboardInterrupt); a terminal's Ctrl-C arrives at
    # a default handler, so give the child one (as tests/test_reliability.py does).
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """Training images and evaluation images of other names (a fine-tune refuses shared ones)."""
    root = tmp_path_factory.mktemp("safety")
    val = image_folder(root / "val", n_classes=2, per_class=1)
    for f in val.rglob("*.JPEG"):
        f.rename(f.with_name(f"val_{f.name}"))
    return image_folder(root / "train", n_classes=2, per_class=2), val


def _wait_for_steps(ck: Path, proc: subprocess.Popen, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        logs = list(ck.glob(f"*/{METRICS}"))
        if logs and len(read_metrics(logs[0])) >= n:
            return
        time.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
    raise AssertionError(f"training did not reach step {n}: {proc.communicate()[1][-3000:]}")


def test_ctrl_c_is_one_line_with_the_resume_command_and_exit_130(folders, tmp_path):
    """Ctrl-C mid-training saves the step and prints the command that continues; that command,
    run on a checkpoint truncated since, stops before training with one line naming the file."""
    train_root, val = folders
    results, ck = tmp_path / "results", tmp_path / "ck"
    fast = [o for o in CLI_FAST if not o.startswith("finetune.images")]
    args = ["method=tome", "loss=kd", f"data.root={val}", f"data.train_root={train_root}", f"checkpoint_dir={ck}"]
    args += [*fast, "finetune.images=400000", "finetune.checkpoint_every=1000000", f"hydra.sweep.dir={tmp_path}/sweep"]
    env = {**os.environ, "FATR_RESULTS_DIR": str(results), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.finetune", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    try:
        _wait_for_steps(ck, proc, 2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    (line,) = [x for x in (out + err).splitlines() if "resume=true" in x]
    (last,) = ck.glob(f"*/{LAST}")
    step = torch.load(last, weights_only=True)["step"]
    assert step >= 2 and line.startswith(f"interrupted at step {step} of 100000 (step {step} saved to {last}); ")
    command = line.split("; continue with: ", 1)[1]
    assert command == shlex.join(["python", "-m", "bench.finetune", *args, "resume=true"])
    assert not results.exists(), "an interrupted fine-tune records nothing"

    last.write_bytes(last.read_bytes()[:1000])  # the disk filled up, or a copy was cut short
    again = subprocess.run(
        [sys.executable, *shlex.split(command)[1:]], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr[-3000:]
    (error,) = [x for x in again.stderr.splitlines() if x.startswith("error:")]
    assert f"checkpoint {last} is truncated or corrupt" in error and f"delete it (or its folder {last.parent})" in error


# -- 3. checkpoints that cannot be resumed, and saves that fail ----------------------------------------

RECIPE = Recipe(**{**TINY_RECIPE, "images": 16, "batch_size": 8, "micro_batch": 8, "checkpoint_every": 2})
IDENTITY = {"recipe": {"lr": 1e-3}, "method": "none"}


def _train(out: Path, identity=IDENTITY, resume: bool = False, **model):
    teacher = tiny_vit(**model)
    return train(copy.deepcopy(teacher), teacher, FixedImages(), RECIPE, out, identity, resume, progress=False)


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("good")
    _train(out)
    return (out / LAST).read_bytes()


def _spoil(case: str, good: bytes, path: Path) -> None:
    if case == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)  # somebody else's checkpoint
    else:
        path.write_bytes(good)


@pytest.mark.parametrize(
    "case, identity, model, says",
    [
        ("truncated", IDENTITY, {}, "is truncated or corrupt (torch cannot read it): "),
        ("empty", IDENTITY, {}, "is truncated or corrupt (torch cannot read it): "),
        ("foreign", IDENTITY, {}, "is not a bench.finetune checkpoint (another program's file?): "),
        ("good", {**IDENTITY, "seed": 1}, {}, "was written by another configuration (differs in: seed): "),
        ("good", IDENTITY, {"embed_dim": 24}, "does not fit this model and recipe ("),
    ],
)
def test_a_checkpoint_that_cannot_be_resumed_is_one_line_naming_it(
    case, identity, model, says, good_checkpoint, tmp_path
):
    last = tmp_path / LAST
    _spoil(case, good_checkpoint, last)
    before = last.read_bytes()
    with pytest.raises(BenchError) as e:
        _train(tmp_path, identity, resume=True, **model)
    message = str(e.value)
    assert says in message and str(last) in message and "\n" not in message
    assert f"delete it (or its folder {tmp_path}) to start this configuration over" in message
    assert "point checkpoint_dir (finetune.out_dir) elsewhere" in message
    assert last.read_bytes() == before, "the checkpoint is the user's to delete"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux) for a real ENOSPC")
def test_a_save_on_a_full_disk_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """The second save (step 4) hits a full disk: a one-line error, and ``last.pt`` still holds
    step 2 intact, no temporary file left; the run continues from it once there is room."""
    recipe = Recipe(**{**RECIPE.__dict__, "images": 32})
    real, calls = trainer_module.save_atomic, []

    def second_save_hits_a_full_disk(obj, path):
        calls.append(obj["step"])
        if len(calls) == 2:  # the temporary file is on a full disk: writes fail with ENOSPC
            path.with_name(path.name + ".tmp").symlink_to("/dev/full")
        return real(obj, path)

    monkeypatch.setattr(trainer_module, "save_atomic", second_save_hits_a_full_disk)
    teacher = tiny_vit()
    with pytest.raises(BenchError) as e:
        train(copy.deepcopy(teacher), teacher, FixedImages(), recipe, tmp_path, IDENTITY, progress=False)
    last = tmp_path / LAST
    assert calls == [2, 4]
    assert str(e.value) == (
        f"disk full: cannot save {last} (No space left on device); the previous last.pt is unchanged; "
        "free space there and continue with resume=true (or start over on another disk with checkpoint_dir=PATH)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST, METRICS]
    assert torch.load(last, weights_only=True)["step"] == 2
    monkeypatch.undo()
    resumed = train(copy.deepcopy(teacher), teacher, FixedImages(), recipe, tmp_path, IDENTITY, True, progress=False)
    assert resumed.steps == 4 and [r["step"] for r in read_metrics(tmp_path / METRICS)] == [1, 2, 3, 4]
