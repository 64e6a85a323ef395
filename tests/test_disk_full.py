"""Issue 25, item 3: a full disk never loses a finished result silently.

A write that runs out of space (or fails otherwise) leaves no half record, no half outcomes
file, no half cache entry and no half-replaced leaderboard; the job is reported failed in one
line and the sweep exits non-zero. Failures are injected (``os.write`` writes half and
returns a short count, then raises ``ENOSPC``, as a filling disk does), and, where this
process may mount, reproduced on a real tiny tmpfs.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from bench_utils import FAST, REPO, image_folder

import bench.measure.cache
import bench.measure.outcomes
import bench.results_io
import bench.store
from bench.errors import BenchError
from bench.leaderboard import write_leaderboard
from bench.measure.cache import MeasurementCache
from bench.measure.outcomes import Outcomes, save_outcomes
from bench.results_io import staged_outputs
from bench.store import append_record, read_records

TESTS = Path(__file__).resolve().parent


def full_disk_write(real: Callable[[int, bytes], int], suffix: str) -> Callable[[int, bytes], int]:
    """An ``os.write`` that, for files whose name ends in ``suffix``, writes half of the first
    buffer and returns the short count, then raises ENOSPC (what a filling disk does); every
    other file is written normally. Also used by the CLI test's child process."""
    state = {"calls": 0}

    def write(fd: int, data: bytes) -> int:
        if not os.readlink(f"/proc/self/fd/{fd}").endswith(suffix):
            return real(fd, data)
        state["calls"] += 1
        if state["calls"] == 1:
            return real(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return write


def _raising(err: int) -> Callable[..., int]:
    def fail(*args: object) -> int:
        raise OSError(err, os.strerror(err))

    return fail


def _on(suffix: str, real: Callable[..., int], fake: Callable[..., int]) -> Callable[..., int]:
    """``fake`` for file descriptors whose file name ends in ``suffix``, ``real`` for the rest
    (the patched ``os`` function is the process's own: nothing else may see the fault)."""

    def call(fd: int, *args: object) -> int:
        return (fake if os.readlink(f"/proc/self/fd/{fd}").endswith(suffix) else real)(fd, *args)

    return call


def _record(method: str, top1: float, pad: int = 0) -> dict:
    return {
        "config_hash": f"h-{method}",
        "method": method,
        "timestamp": "2026-01-01T00:00:00+00:00",
        "model": "tiny",
        "data_root": "/d/val",
        "num_images": 6,
        "budget": {"macs_ratio_target": 0.5},
        "config": {"model": {"name": "tiny"}, "data": {"root": "/d/val"}},
        "metrics": {"top1": top1, "gmacs": 1.0, "macs_ratio": 0.5, "speedup": 1.5, "latency_ms": 3.0},
        "padding": "x" * pad,
    }


def _outcomes(n: int = 4000) -> Outcomes:
    rng = np.random.default_rng(0)
    return Outcomes(
        image_ids=np.array([f"n{rng.integers(1e8):08d}/img_{i}.JPEG" for i in range(n)]),
        pred=rng.integers(0, 1000, n).astype(np.int16),
        label=rng.integers(0, 1000, n).astype(np.int16),
        correct=rng.random(n) < 0.5,
        agree=rng.random(n) < 0.5,
        top5_hit=rng.random(n) < 0.5,
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- the run store -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "write,fsync,message",
    [
        ("short", None, "disk full: could not append the record to {} (No space left on device)"),
        ("zero", None, "disk full: could not append the record to {} (No space left on device)"),
        (errno.EDQUOT, None, "disk full: could not append the record to {} (Disk quota exceeded)"),
        (errno.EIO, None, "could not append the record to {} (Input/output error)"),
        (None, errno.ENOSPC, "disk full: could not append the record to {} (No space left on device)"),
    ],
)
def test_a_failed_append_leaves_the_store_as_it_was(tmp_path, monkeypatch, write, fsync, message):
    append_record(tmp_path, _record("tome", 70.0))
    append_record(tmp_path, _record("evit", 60.0))
    runs = tmp_path / "runs.jsonl"
    before = runs.read_bytes()
    if write == "short":
        monkeypatch.setattr(bench.store.os, "write", full_disk_write(os.write, "runs.jsonl"))
    elif write == "zero":
        monkeypatch.setattr(bench.store.os, "write", _on("runs.jsonl", os.write, lambda fd, data: 0))
    elif write is not None:
        monkeypatch.setattr(bench.store.os, "write", _on("runs.jsonl", os.write, _raising(write)))
    if fsync is not None:
        monkeypatch.setattr(bench.store.os, "fsync", _on("runs.jsonl", os.fsync, _raising(fsync)))
    with pytest.raises(BenchError) as caught:
        append_record(tmp_path, _record("fatr", 65.0))
    assert str(caught.value) == message.format(runs) + "; earlier records are unchanged"
    assert "\n" not in str(caught.value)
    assert runs.read_bytes() == before, "no half record"
    monkeypatch.undo()
    append_record(tmp_path, _record("fatr", 65.0))  # space freed: the next append starts a clean line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r["method"] for r in read_records(tmp_path)] == ["tome", "evit", "fatr"]


def test_a_short_write_that_completes_is_one_whole_line(tmp_path, monkeypatch):
    """A short count is not an error by itself (a signal, a quota edge): the rest is written."""
    real_write = os.write
    seven_bytes = _on("runs.jsonl", real_write, lambda fd, data: real_write(fd, bytes(data[:7])))
    monkeypatch.setattr(bench.store.os, "write", seven_bytes)
    append_record(tmp_path, _record("tome", 70.0, pad=100))
    append_record(tmp_path, _record("evit", 60.0))
    monkeypatch.undo()
    assert [r["method"] for r in read_records(tmp_path)] == ["tome", "evit"]


def test_a_store_that_cannot_be_created_is_one_line(tmp_path, monkeypatch):
    real_open = os.open

    def no_new_inode(path, *args, **kwargs):
        if str(path).endswith("runs.jsonl"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(bench.store.os, "open", no_new_inode)
    with pytest.raises(BenchError, match=r"^disk full: could not append the record to .*runs\.jsonl \(No space"):
        append_record(tmp_path, _record("tome", 70.0))
    assert not (tmp_path / "runs.jsonl").exists()


# -- per-image outcomes and the measurement cache -------------------------------------------------


def test_outcomes_that_cannot_be_written_leave_no_file(tmp_path, monkeypatch):
    def half_then_full(f, **arrays):
        f.write(b"PK\x03\x04 half an archive")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(bench.measure.outcomes.np, "savez_compressed", half_then_full)
    with pytest.raises(BenchError, match=r"^disk full: could not write per-image outcomes .*/preds/abc-\w{8}\.npz \("):
        save_outcomes(tmp_path, "abc", _outcomes(10))
    assert list((tmp_path / "preds").iterdir()) == [], "not even the temporary file"


def test_a_cache_entry_that_cannot_be_written_is_a_warning_not_a_failure(tmp_path, monkeypatch, capsys):
    cache = MeasurementCache(tmp_path, {"model": "tiny"})
    monkeypatch.setattr(bench.measure.cache.os, "fsync", _on(".tmp", os.fsync, _raising(errno.ENOSPC)))
    value, from_cache = cache.get_or_compute("acc", {"n": 1}, lambda: {"top1": 70.0})
    assert (value, from_cache) == ({"top1": 70.0}, False), "the job keeps its measurement"
    err = capsys.readouterr().err
    assert err.startswith("warning: disk full: could not write cache entry ") and err.count("\n") == 1
    assert err.rstrip().endswith("(No space left on device); not cached")
    assert list((tmp_path / "cache").iterdir()) == [], "no partial entry, no temporary file"
    monkeypatch.undo()
    assert cache.load("acc", {"n": 1}) is None and capsys.readouterr().err == "", "a plain miss"


# -- generated files ------------------------------------------------------------------------------


def test_a_full_disk_while_staging_leaves_the_leaderboard_and_is_one_line(tmp_path, monkeypatch, capsys):
    import bench.report.plots
    from bench.leaderboard import main

    append_record(tmp_path, _record("tome", 70.0))
    write_leaderboard(tmp_path, n_boot=100)
    before = _files(tmp_path)
    append_record(tmp_path, _record("evit", 60.0))
    monkeypatch.setattr(bench.report.plots, "plot_latency", _raising(errno.ENOSPC))
    assert main([str(tmp_path), "--n-boot", "100"]) == 2
    message = f"disk full: could not write the generated files in {tmp_path} (No space left on device)"
    assert capsys.readouterr().err.splitlines() == [f"error: {message}; previous files unchanged"]
    after = _files(tmp_path)
    assert {k: v for k, v in after.items() if k != "runs.jsonl"} == {
        k: v for k, v in before.items() if k != "runs.jsonl"
    }
    assert not [p for p in tmp_path.iterdir() if p.is_dir()], "no staging folder left behind"


def test_a_move_that_fails_puts_back_what_was_moved(tmp_path, monkeypatch):
    """Renames can fail on a full disk too: the first moves are undone, new files and folders go."""
    (tmp_path / "a.txt").write_text("old a")
    real_replace = os.replace
    calls = {"n": 0}

    def third_fails(src, dst):
        calls["n"] += 1
        if calls["n"] == 3 and ".staging-" in str(src) and ".previous" not in str(src):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(bench.results_io.os, "replace", third_fails)
    with pytest.raises(BenchError, match=r"^disk full: .*; previous files unchanged$"):
        with staged_outputs(tmp_path) as stage:
            for name in ("a.txt", "b.txt", "sub/c.txt"):
                (stage / name).parent.mkdir(exist_ok=True)
                (stage / name).write_text(f"new {name}")
    assert calls["n"] >= 3, "the third move was attempted"
    assert _files(tmp_path) == {"a.txt": b"old a"}
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"], "no new folder, no staging folder"


def test_a_filesystem_without_hard_links_still_gets_its_files(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("old a")
    monkeypatch.setattr(bench.results_io.os, "link", _raising(errno.EPERM))
    with staged_outputs(tmp_path) as stage:
        (stage / "a.txt").write_text("new a")
    assert _files(tmp_path) == {"a.txt": b"new a"}


# -- a real tiny filesystem -----------------------------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path) -> Iterator[Path]:
    """A 1 MiB tmpfs at ``tmp_path/fs``; skipped where this process may not mount."""
    mount = tmp_path / "fs"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    except OSError as e:
        pytest.skip(f"cannot run mount: {e}")
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(folder: Path) -> Path:
    """Take every free byte of ``folder``'s filesystem; returns the filler file."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_a_real_full_filesystem_loses_nothing_it_had(tiny_fs, capsys):
    results = tiny_fs / "results"
    append_record(results, _record("tome", 70.0))
    write_leaderboard(results, n_boot=100)
    (results / "preds").mkdir()
    (results / "cache").mkdir()
    before = _files(results)
    filler = _fill(tiny_fs)

    lost_record = r"^disk full: could not append the record to .*runs\.jsonl .*; earlier records are unchanged$"
    with pytest.raises(BenchError, match=lost_record):
        append_record(results, _record("evit", 60.0, pad=20000))  # more than the last page's slack
    with pytest.raises(BenchError, match=r"^disk full: could not write per-image outcomes "):
        save_outcomes(results, "evit", _outcomes())
    assert MeasurementCache(results, {"model": "tiny"}).store("acc", {}, list(range(5000))) is None
    assert "warning: disk full: could not write cache entry" in capsys.readouterr().err
    with pytest.raises(BenchError, match=r"^disk full: could not write the generated files in "):
        write_leaderboard(results, n_boot=100)
    assert _files(results) == before, "every earlier file intact, no partial or temporary file"

    filler.unlink()
    append_record(results, _record("evit", 60.0, pad=20000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r["method"] for r in read_records(results)] == ["tome", "evit"]


# -- the whole command ----------------------------------------------------------------------------


def test_a_sweep_whose_record_cannot_be_written_fails_and_changes_nothing(tmp_path):
    """The job used to be reported done with half a JSON line in runs.jsonl."""
    results = tmp_path / "results"
    append_record(results, _record("tome", 70.0))
    before = (results / "runs.jsonl").read_bytes()
    val = image_folder(tmp_path / "val", 2, 1)
    child = (
        f"import os, sys; sys.path.insert(0, {str(TESTS)!r}); from test_disk_full import full_disk_write; "
        "os.write = full_disk_write(os.write, 'runs.jsonl'); "
        "import runpy; runpy.run_module('bench.run', run_name='__main__', alter_sys=True)"  # as python -m bench.run
    )
    overrides = [
        "method=evit",
        f"data.root={val}",
        f"results_dir={results}",
        f"hydra.sweep.dir={tmp_path}/sweep",
        "budget.macs_ratio=null",
        "cache=false",
        "stats.n_boot=100",
        "bench.latency.enabled=false",
        "bench.flops=false",
        "bench.spectral.enabled=false",
        "bench.scaling.enabled=false",
        *FAST,
    ]
    out = subprocess.run(
        [sys.executable, "-c", child, *overrides], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: disk full: could not append the record to {results}/runs.jsonl (No space left on device); "
        "earlier records are unchanged"
    ]
    assert "1 job(s) failed" in out.stderr
    assert (results / "runs.jsonl").read_bytes() == before, "byte-identical"
    assert list((results / "preds").iterdir()) == [], "no outcomes file that no record names"
    assert not list((tmp_path / "sweep").glob("*/done.txt")), "not reported done"
    assert json.loads(before)["method"] == "tome" and "| tome |" in (results / "leaderboard.md").read_text()


def test_failure_note_on_a_full_disk_still_lists_the_job(tmp_path, monkeypatch):
    """A failed job whose ``error.txt`` cannot be written (the sweep folder on the full disk) is
    still listed by the sweep summary of the same process, so the sweep still exits non-zero."""
    import bench.errors as errors
    from bench.callbacks import SweepSummary

    sweep = tmp_path / "sweep"
    job = sweep / "0_tome"  # never created: writing the note fails like on a full disk
    monkeypatch.setattr(errors, "job_output_dir", lambda: job)
    monkeypatch.setattr(errors, "_UNWRITTEN", {})
    errors.record_failure("disk full: could not append the record")
    summary = SweepSummary()
    summary.sweep_dir = str(sweep)
    assert summary.marked(errors.FAILURE_FILE) == [("0_tome", "disk full: could not append the record")]
    assert summary.marked(errors.DONE_FILE) == []
