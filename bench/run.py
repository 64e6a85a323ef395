"""Entry point: ``python -m bench.run method=fatr,tome,evit``.

The primary config sets ``hydra.mode: MULTIRUN``, so comma-separated values sweep without
``-m``. Bad input ends the job with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from bench.errors import BenchError
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
        sys.exit(2)


if __name__ == "__main__":
    main()
