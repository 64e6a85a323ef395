"""Entry point: ``python -m bench.run method=fatr,tome,evit``.

The primary config sets ``hydra.mode: MULTIRUN``, so comma-separated values sweep without
``-m``. Bad input that every job shares (a setting, the device, the images or weights) stops
the sweep before its first job with one line on stderr and status 2
(:class:`bench.callbacks.SweepSummary`), and so does what a run of one method at one budget
could not do with its reducer (a budget its knob cannot reach). Bad input of one job (a swept
value, a budget one method of several cannot reach) ends that job with one line, never a
traceback; the other jobs of the sweep still run, and the sweep exits with status 2 after
listing the failed jobs. An unexpected exception (a bug) is reported the same way, its
traceback saved in the job's folder. Ctrl-C stops the sweep with one line and status 130.
A value of the wrong type for the typed schema (``bench.latency.iters=abc``, see
:mod:`bench.config`) stops the sweep before its first job, with one line and status 2.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import hydra
from omegaconf import DictConfig

import bench.config  # noqa: F401  registers the schemas (base_config) the config's defaults list names
import bench.sweep_id  # noqa: F401  registers the ${fatr_run_id:} resolver the config's sweep folder uses
from bench.errors import BenchError, job_output_dir, record_done, record_failure
from bench.terminal import say
from methods import ReducerConfigError, UnsupportedModelError

USER_ERRORS = (BenchError, ReducerConfigError, UnsupportedModelError)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict | None:
    from bench.job import run_job

    try:
        record = run_job(cfg)
    except USER_ERRORS as e:
        say(f"error: {e}")  # above the sweep's bar, not glued to it
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
        say(f"error: {message}")
        record_failure(message)
        return None
    if record is not None:
        record_done(f"{record['method']} ({record['config_hash']})")
    return record


@contextmanager
def config_errors_in_one_line() -> Iterator[None]:
    """A setting whose value does not fit the schema's type fails Hydra's composition, before
    any job, where Hydra would print its own several-line report (and exit 1). Inside this,
    such a failure ends the command as bad input does: one ``error:`` line (the setting's own
    check message, :func:`bench.validate.config_error`), status 2, and so does an option a
    config group does not have (``model=deit_huge``: the line lists the group's options).
    A malformed override keeps Hydra's report.

    Hydra has no hook for composition errors: its ``run_and_report`` (``hydra._internal.utils``)
    is wrapped for the duration; ``tests/test_config_schema.py`` runs the command to check it.

    In a sweep (``method=fatr,tome``) Hydra first composes the config to read ``hydra.mode``
    (``Hydra.get_mode``); when that fails it swallows the error and composes again as a single
    run, which refuses the comma list ("Ambiguous value for argument 'method=fatr,tome'")
    before it reaches the real error. ``get_mode`` is wrapped too, so the error reported is the
    first composition's."""
    import hydra._internal.utils as hydra_utils
    from hydra._internal.hydra import Hydra
    from hydra.errors import ConfigCompositionException
    from hydra.types import RunMode

    report = hydra_utils.run_and_report
    get_mode = Hydra.get_mode
    mode_errors: list[Exception] = []

    def get_mode_keeping_its_error(self: Hydra, config_name: str | None, overrides: list[str]) -> Any:
        mode = get_mode(self, config_name, overrides)
        if mode is None:  # composition failed: compose again, as get_mode did, to keep the error
            try:
                self.compose_config(
                    config_name=config_name,
                    overrides=overrides,
                    with_log_configuration=False,
                    run_mode=RunMode.MULTIRUN,
                    validate_sweep_overrides=False,
                )
            except Exception as e:  # noqa: BLE001 - reported below, where Hydra reports its own
                mode_errors.append(e)
        return mode

    def run_and_report(func: Callable[[], Any]) -> Any:
        def composed() -> Any:
            try:
                return func()
            except ConfigCompositionException as e:
                from bench.callbacks import close_sweep_bar
                from bench.validate import config_error

                error = config_error(mode_errors[0] if mode_errors else e)
                if error is None:
                    raise
                close_sweep_bar(clear=True)  # Hydra composes a sweep's jobs after its bar is drawn
                print(f"error: {error}", file=sys.stderr)
                sys.exit(2)

        return report(composed)

    hydra_utils.run_and_report = run_and_report
    Hydra.get_mode = get_mode_keeping_its_error  # type: ignore[method-assign]
    try:
        yield
    finally:
        hydra_utils.run_and_report = report
        Hydra.get_mode = get_mode  # type: ignore[method-assign]


def cli() -> None:
    try:
        with config_errors_in_one_line():
            main()
    except KeyboardInterrupt:
        from bench.callbacks import report_interrupt

        sys.exit(report_interrupt())


if __name__ == "__main__":
    cli()
