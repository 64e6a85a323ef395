"""The run store: one JSON line per finished job in ``results/runs.jsonl``.

Appends write one complete line under an exclusive lock, then fsync, so a job killed at any
moment leaves either its whole record or nothing, and parallel jobs (joblib, SLURM array tasks
on a shared filesystem) never interleave. A write that fails part-way (a full disk) is cut
back to the size the file had, and the job fails with one line: a finished result is never
silently half-written. Readers skip a damaged line with a warning rather than failing the
whole leaderboard.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import platform
import subprocess
import warnings
from pathlib import Path
from typing import Any

import torch

from bench.results_io import write_failure

RUNS_FILE = "runs.jsonl"


def config_hash(config: dict[str, Any]) -> str:
    """Stable short hash of what determines a job's numbers (not when or where it ran)."""
    blob = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


GENERATED = ["results/runs.jsonl", "results/preds", "results/leaderboard.*", "results/*.png"]
"""Files the harness itself writes when it publishes reference results: a change to them is
not a change to the code, so it does not mark later records ``-dirty``."""


def git_commit(repo: Path | None = None) -> str:
    """The code's commit, ``-dirty`` if tracked files differ from it. ``FATR_GIT_COMMIT``
    overrides it where the code travels without ``.git`` (``bench.gpu_session`` sets it from
    the commit it read before the copy)."""
    if os.environ.get("FATR_GIT_COMMIT"):
        return os.environ["FATR_GIT_COMMIT"]
    repo = repo or Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *(f":(exclude){g}" for g in GENERATED)],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip()[:12] + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu} ({torch.get_num_threads()} threads)"


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def append_record(results_dir: str | Path, record: dict[str, Any]) -> Path:
    """Append ``record`` as one JSON line to the run store; returns the store's path.

    Raises :class:`~bench.errors.BenchError` (one line, ``disk full: ...`` when space or
    quota ran out) when the line cannot be written whole; the file is then cut back to its
    size before this call, so earlier records stay intact and no half line remains."""
    path = Path(results_dir) / RUNS_FILE
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise write_failure("could not append the record to", path, e, "; earlier records are unchanged") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _append_locked(fd, path, line)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    return path


def _append_locked(fd: int, path: Path, line: bytes) -> None:
    """Write ``line`` at the end of ``fd`` (lock held), or leave the file as it was and raise."""
    size = os.fstat(fd).st_size
    # A previous writer killed mid-line must not glue its fragment onto our record.
    if size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = b"\n" + line
    try:
        _write_all(fd, line)
        os.fsync(fd)
    except OSError as e:
        raise write_failure("could not append the record to", path, e, _cut_back(fd, size)) from None


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written: a regular file returns a short count when
    the disk fills part-way, and the next call then raises the reason (``ENOSPC``)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # no progress and no error: call it what it almost always is
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]


def _cut_back(fd: int, size: int) -> str:
    """Truncate to ``size`` (what the file held before the failed append); returns the words
    that tell the user what is left: intact earlier records, or a fragment readers skip."""
    try:
        os.ftruncate(fd, size)
    except OSError:
        return "; a partial line may remain (readers skip it, the next record starts on a new line)"
    with contextlib.suppress(OSError):  # truncated either way; this only hurries it to disk
        os.fsync(fd)
    return "; earlier records are unchanged"


def read_records(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every record in the run store; a damaged line, or a JSON value that is not an object,
    is skipped with a warning."""
    return [record for _, record in _numbered_records(Path(results_dir) / RUNS_FILE)]


def _numbered_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    if not path.exists():
        return []
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            warnings.warn(f"{path}:{n} is not a complete record (interrupted write?); skipped", stacklevel=3)
            continue
        if not isinstance(record, dict):
            warnings.warn(f"{path}:{n} is not a run record (a JSON {type(record).__name__}); skipped", stacklevel=3)
            continue
        records.append((n, record))
    return records


# What the leaderboard reads from a record, and the type each must have.
_REQUIRED = {"config_hash": str, "method": str, "metrics": dict, "timestamp": str}
_OPTIONAL = {"budget": dict, "config": dict, "variant": (str, type(None)), "model": str, "data_root": str}


def record_problem(record: dict[str, Any]) -> str | None:
    """Why ``record`` cannot be tabulated (a missing key or one of the wrong type), or None."""
    for key, kind in _REQUIRED.items():
        if not isinstance(record.get(key), kind):
            return f"no {key!r}" if key not in record else f"{key!r} is a {type(record[key]).__name__}"
    for key, kind in _OPTIONAL.items():
        if key in record and not isinstance(record[key], kind):
            return f"{key!r} is a {type(record[key]).__name__}"
    return None


def read_run_records(results_dir: str | Path) -> list[dict[str, Any]]:
    """The records the leaderboard can use; any other is skipped with a warning that says why."""
    path = Path(results_dir) / RUNS_FILE
    good = []
    for n, record in _numbered_records(path):
        problem = record_problem(record)
        if problem:
            warnings.warn(f"{path}:{n} is not a run record ({problem}); skipped", stacklevel=2)
            continue
        good.append(record)
    return good


def recorded_hashes(results_dir: str | Path, redo_busy: bool = False) -> set[str]:
    """The configs ``results_dir`` holds a record of; with ``redo_busy`` only those whose latest
    record's latency was not measured on a busy machine (``resume=busy``: a sweep rerun on a
    host that is quiet only at times fills in what a busy spell spoiled)."""
    latest = {r["config_hash"]: r for r in read_records(results_dir) if "config_hash" in r}
    if not redo_busy:
        return set(latest)
    return {h for h, r in latest.items() if not (r.get("metrics") or {}).get("latency_busy")}
