"""One exception type for bad input, so the entry point can print one line instead of a traceback."""

from pathlib import Path


class BenchError(Exception):
    """A problem with the user's configuration or files, explained in one line."""


FAILURE_FILE = "error.txt"


def record_failure(message: str) -> None:
    """Leave the error in the job's output folder, where the sweep summary finds it (this
    works for every launcher: local, joblib processes, SLURM nodes on a shared filesystem)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        out = Path(HydraConfig.get().runtime.output_dir)
        (out / FAILURE_FILE).write_text(message + "\n")
    except (ValueError, OSError):
        pass
