"""One exception type for bad input, so the entry point can print one line instead of a traceback."""

from pathlib import Path


class BenchError(Exception):
    """A problem with the user's configuration or files, explained in one line."""


FAILURE_FILE = "error.txt"
SKIP_FILE = "skipped.txt"
DONE_FILE = "done.txt"


def record_failure(message: str) -> None:
    """Leave the error in the job's output folder, where the sweep summary finds it (this
    works for every launcher: local, joblib processes, SLURM nodes on a shared filesystem)."""
    _leave_note(FAILURE_FILE, message)


def record_skip(message: str) -> None:
    """Mark a job that ``resume=true`` skipped, so the sweep summary lists it as skipped."""
    _leave_note(SKIP_FILE, message)


def record_done(message: str) -> None:
    """Mark a job that finished and appended its record (counted when a sweep is interrupted)."""
    _leave_note(DONE_FILE, message)


def job_output_dir() -> Path | None:
    """This job's Hydra output folder, or None outside a Hydra job."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return None


_UNWRITTEN: dict[tuple[Path, str], str] = {}
"""Notes that could not be written (a full disk under the sweep folder), by (job folder, file
name): the sweep summary in the same process still finds them, so a failed job is still listed
and the sweep still exits non-zero."""


def _leave_note(filename: str, message: str) -> None:
    out = job_output_dir()
    if out is None:
        return
    try:
        (out / filename).write_text(message + "\n")
    except OSError:
        _UNWRITTEN[(out.absolute(), filename)] = message


def unwritten_notes(sweep_dir: Path, filename: str) -> list[tuple[str, str]]:
    """(job folder name, message) of the notes named ``filename`` under ``sweep_dir`` that this
    process could not write."""
    return [
        (job.name, message)
        for (job, name), message in _UNWRITTEN.items()
        if name == filename and job.parent == sweep_dir.absolute()
    ]
