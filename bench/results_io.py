"""The results folder: checked writable before any job measures, generated files replaced
all together or not at all, and a failed write (a full disk) reported in one line.

A read-only folder must stop a sweep before minutes of measurement are thrown away, and a
leaderboard that fails half-way must not leave a new ``leaderboard.md`` next to stale plots.
A full disk is the usual reason a write fails after the folder was checked, so it is named
as such: the user has to free space, not fix a setting.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.errors import BenchError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
"""The errnos of a full filesystem or an exhausted quota."""


def write_failure(action: str, path: str | Path, err: OSError, outcome: str = "") -> BenchError:
    """One line for a failed write: ``disk full: <action> <path> (<reason>)<outcome>`` when the
    filesystem or quota is full, else ``<action> <path> (<reason>)<outcome>``.

    ``action`` says what was lost (``could not append the record to``) and ``outcome`` what
    is left as it was (``; earlier records are unchanged``), since that is what the user must
    decide on: free space and rerun, or nothing was damaged."""
    prefix = "disk full: " if err.errno in DISK_FULL else ""
    return BenchError(f"{prefix}{action} {path} ({err.strerror or err}){outcome}")


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
    (same relative path, atomic rename per file), on any error leave ``results_dir`` as it was.

    A write that fails in the staging folder or while moving (a full disk) raises one-line
    :class:`BenchError` naming ``results_dir``; the staging folder is always removed."""
    results_dir = Path(results_dir)
    stage: Path | None = None
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=results_dir, prefix=".staging-"))
        yield stage
        _commit(stage, results_dir)
    except OSError as e:
        raise write_failure(
            "could not write the generated files in", results_dir, e, "; previous files unchanged"
        ) from None
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)


def _commit(stage: Path, results_dir: Path) -> None:
    """Move every file of ``stage`` into ``results_dir``; if one move fails, move back what
    was moved (renames can fail on a full disk too: a new name may need a directory block).

    The previous files are kept as hard links in the stage until all moves succeeded, so a
    reader of ``results_dir`` sees the old set or the new set, each file whole."""
    moves = [(src, results_dir / src.relative_to(stage)) for src in sorted(p for p in stage.rglob("*") if p.is_file())]
    made: list[Path] = []
    previous: dict[Path, Path | None] = {}
    done: list[Path] = []
    try:
        _make_parents([dst.parent for _, dst in moves], results_dir, made)
        previous = _keep_previous([dst for _, dst in moves], results_dir, stage / ".previous")
        for src, dst in moves:
            os.replace(src, dst)
            done.append(dst)
    except OSError:
        _undo(done, previous, made)
        raise


def _make_parents(folders: list[Path], results_dir: Path, made: list[Path]) -> None:
    """Create the missing ``folders`` under ``results_dir``, parents first, adding each to
    ``made`` as it is created (so a failure part-way can still remove them)."""
    for folder in sorted(set(folders), key=lambda f: len(f.parts)):
        missing = [f for f in [folder, *folder.parents] if f.is_relative_to(results_dir) and f != results_dir]
        for f in reversed(missing):
            if not f.exists():
                f.mkdir()
                made.append(f)


def _keep_previous(targets: list[Path], results_dir: Path, keep: Path) -> dict[Path, Path | None]:
    """Hard-link each existing target into ``keep``. Maps every existing target to its copy,
    or to None where the filesystem has no hard links (then it cannot be put back)."""
    previous: dict[Path, Path | None] = {}
    for dst in targets:
        if not dst.exists():
            continue
        previous[dst] = copy = keep / dst.relative_to(results_dir)
        try:
            copy.parent.mkdir(parents=True, exist_ok=True)
            os.link(dst, copy)
        except OSError as e:
            if e.errno in DISK_FULL:
                raise  # nothing has moved yet: the caller reports it and results_dir is as it was
            previous[dst] = None
    return previous


def _undo(done: list[Path], previous: dict[Path, Path | None], made: list[Path]) -> None:
    """Put back the files a failed commit replaced, remove the ones it added, then the folders
    it created. Best effort: a new file that replaced one that could not be kept stays."""
    for dst in reversed(done):
        try:
            if dst not in previous:
                dst.unlink()
            elif (copy := previous[dst]) is not None:
                os.replace(copy, dst)
        except OSError:
            pass
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:
            pass


def append_markdown(results_dir: str | Path, lines: list[str]) -> None:
    """Add a section's lines to the ``leaderboard.md`` being generated in ``results_dir``."""
    md = Path(results_dir) / "leaderboard.md"
    md.write_text(md.read_text() + "\n".join(lines))
