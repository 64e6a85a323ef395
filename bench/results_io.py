"""The results folder: checked writable before any job measures, and generated files replaced
all together or not at all.

A read-only folder must stop a sweep before minutes of measurement are thrown away, and a
leaderboard that fails half-way must not leave a new ``leaderboard.md`` next to stale plots.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.errors import BenchError


def check_writable(results_dir: str | Path) -> None:
    """Raise :class:`BenchError` unless records can be written to ``results_dir``.

    Probes by creating (and removing) a file, since permission bits do not tell the whole
    story (read-only mounts, root). A folder that does not exist yet is not created here: its
    nearest existing parent must accept new entries, so a job that fails later leaves no
    empty results folder behind.
    """
    path = Path(results_dir).expanduser().absolute()
    probe_dir = path
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise BenchError(f"results_dir {path} cannot be created: {probe_dir} is a file, not a folder")
    what = f"results_dir {path}" + ("" if probe_dir == path else f" cannot be created: {probe_dir}")
    try:
        with tempfile.TemporaryFile(dir=probe_dir, prefix=".fatr-write-probe-"):
            pass
    except OSError as e:
        raise BenchError(
            f"{what} is not writable ({e.strerror or e}); set results_dir=PATH or FATR_RESULTS_DIR"
        ) from None
    runs = path / "runs.jsonl"
    if runs.exists():
        try:
            os.close(os.open(runs, os.O_WRONLY | os.O_APPEND))
        except OSError as e:
            raise BenchError(f"{runs} is not writable ({e.strerror or e})") from None


@contextmanager
def staged_outputs(results_dir: str | Path) -> Iterator[Path]:
    """Write generated files into a staging folder; on success move each into ``results_dir``
    (same relative path, atomic rename per file), on any error leave ``results_dir`` as it was."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=results_dir, prefix=".staging-"))
    try:
        yield stage
        for src in sorted(p for p in stage.rglob("*") if p.is_file()):
            dst = results_dir / src.relative_to(stage)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def append_markdown(results_dir: str | Path, lines: list[str]) -> None:
    """Add a section's lines to the ``leaderboard.md`` being generated in ``results_dir``."""
    md = Path(results_dir) / "leaderboard.md"
    md.write_text(md.read_text() + "\n".join(lines))
