"""The run store: one JSON line per finished job in ``results/runs.jsonl``.

Appends are a single ``write`` of one complete line under an exclusive lock, then fsync, so a
job killed at any moment leaves either its whole record or nothing, and parallel jobs
(joblib, SLURM array tasks on a shared filesystem) never interleave. Readers skip a damaged
line with a warning rather than failing the whole leaderboard.
"""

from __future__ import annotations

import datetime as dt
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

RUNS_FILE = "runs.jsonl"


def config_hash(config: dict[str, Any]) -> str:
    """Stable short hash of what determines a job's numbers (not when or where it ran)."""
    blob = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


GENERATED = ["results/runs.jsonl", "results/preds", "results/leaderboard.*", "results/*.png"]
"""Files the harness itself writes when it publishes reference results: a change to them is
not a change to the code, so it does not mark later records ``-dirty``."""


def git_commit(repo: Path | None = None) -> str:
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
    path = Path(results_dir) / RUNS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # A previous writer killed mid-line must not glue its fragment onto our record.
        if os.fstat(fd).st_size:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    return path


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


def recorded_hashes(results_dir: str | Path) -> set[str]:
    return {r["config_hash"] for r in read_records(results_dir) if "config_hash" in r}
