"""Entry point: ``python -m bench.run method=fatr,tome,evit``.

The primary config sets ``hydra.mode: MULTIRUN``, so comma-separated values sweep without
``-m``. Bad input ends the job with one line on stderr, never a traceback; the other jobs of
the sweep still run, and the sweep exits with status 2 after listing the failed jobs. An
unexpected exception (a bug) is reported the same way, its traceback saved in the job's
folder. Ctrl-C stops the sweep with one line and status 130.
"""

from __future__ import annotations

import os
import sys
import traceback

import hydra
from omegaconf import DictConfig

import bench.sweep_id  # noqa: F401  registers the ${fatr_run_id:} resolver the config's sweep folder uses
from bench.errors import BenchError, job_output_dir, record_done, record_failure
from methods import ReducerConfigError, UnsupportedModelError

USER_ERRORS = (BenchError, ReducerConfigError, UnsupportedModelError)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict | None:
    from bench.job import run_job

    try:
        record = run_job(cfg)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        record_failure(str(e))
        return None
    except Exception as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = f"unexpected {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        out = job_output_dir()
        if out is not None:
            (out / "traceback.txt").write_text(traceback.format_exc())
            message += f" (a bug; traceback in {out / 'traceback.txt'})"
        else:
            traceback.print_exc()
        print(f"error: {message}", file=sys.stderr)
        record_failure(message)
        return None
    if record is not None:
        record_done(f"{record['method']} ({record['config_hash']})")
    return record


def cli() -> None:
    try:
        main()
    except KeyboardInterrupt:
        from bench.callbacks import report_interrupt

        sys.exit(report_interrupt())


if __name__ == "__main__":
    cli()
