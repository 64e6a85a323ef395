"""Entry point: ``python -m bench.run method=fatr,tome,evit``.

The primary config sets ``hydra.mode: MULTIRUN``, so comma-separated values sweep without
``-m``. Bad input ends the job with one line on stderr, never a traceback; the other jobs of
the sweep still run, and the sweep exits with status 2 after listing the failed jobs.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from bench.errors import BenchError, record_failure
from methods import ReducerConfigError, UnknownMethodError, UnsupportedModelError

USER_ERRORS = (BenchError, ReducerConfigError, UnknownMethodError, UnsupportedModelError)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict | None:
    import fatr  # noqa: F401  registers FATR next to the baselines
    from bench.job import run_job

    try:
        return run_job(cfg)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        record_failure(str(e))
        return None


if __name__ == "__main__":
    main()
