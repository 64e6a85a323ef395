"""Hydra callbacks: a sweep-level progress bar, the leaderboard, one summary table, and a clean Ctrl-C."""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from tqdm.auto import tqdm

import bench.sweep_id  # noqa: F401  registers ${fatr_run_id:}, also in launcher processes


def sweep_sizes(config: DictConfig) -> dict[str, int]:
    """Number of values of each swept key, from the command-line and config sweeps."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = list(config.hydra.overrides.task)
    params = config.hydra.sweeper.get("params") or {}
    overrides += [f"{k}={v}" for k, v in params.items()]
    parsed = OverridesParser.create().parse_overrides(overrides)
    sizes: dict[str, int] = {}
    for o in parsed:
        if o.is_sweep_override():
            sizes[o.get_key_element()] = len(list(o.sweep_string_iterator()))
    return sizes


def count_jobs(config: DictConfig) -> int | None:
    """Number of jobs the basic sweeper will launch."""
    try:
        return math.prod(sweep_sizes(config).values())
    except Exception:  # noqa: BLE001 - a progress total is nice to have, never worth failing for
        return None


def check_sources(config: DictConfig) -> None:
    """Find the sweep's weights and images once before its first job (downloading Imagenette
    there if it is the source), so an offline machine with nothing local gets one error line,
    not one per job; a checkpoint file or image folder that is missing (or empty, or not in the
    ImageNet layout) and random weights asked for accuracy or spectral numbers are refused here
    too. A sweep over models, data folders or bench settings leaves that to each job.

    ``config`` is the sweep's composed tree, of ``bench.run`` (typed sections) or of
    ``bench.finetune`` (untyped); only its ``model``, ``data`` and ``bench`` sections are read."""
    from bench.sources import check_random_weights, resolve_sources

    try:
        groups = swept_sections(config)
    except Exception:  # noqa: BLE001 - the jobs check their own sources
        return
    if not groups & {"model", "bench"}:
        check_random_weights(config.model, config.bench)
    if groups & {"model", "data"}:
        return
    from bench.data import list_images
    from bench.models import check_checkpoint_file

    resolved = resolve_sources(config, announce=False)
    if resolved.model.checkpoint:
        check_checkpoint_file(resolved.model.checkpoint)
    list_images(resolved.data.root)  # what every job reads first: the folder's classes and files


def swept_sections(config: DictConfig) -> set[str]:
    """The top-level sections (``bench``, ``model``, ...) a sweep varies between its jobs."""
    return {k.lstrip("+~").split("/")[0].split(".")[0] for k in sweep_sizes(config)}


def runs_here(config: DictConfig) -> bool:
    """Whether the sweep's jobs run on this machine, one after another in this process (Hydra's
    basic launcher, the default). Only then can a check that depends on the machine
    (``device=auto``, CUDA graphs, batch sizes by device) be made for them before they start: a
    cluster launcher runs them elsewhere."""
    from omegaconf import OmegaConf

    return str(OmegaConf.select(config, "hydra.launcher._target_", default="")).endswith(".BasicLauncher")


def shared_by_every_job(config: DictConfig, sections: set[str]) -> bool:
    """Whether every job of the sweep reads the same values in ``sections`` (none of them is
    swept) and runs here (:func:`runs_here`): then a check of them made once, before the first
    job, is each job's own. Where that cannot be told, each job checks its own."""
    try:
        return runs_here(config) and not swept_sections(config) & sections
    except Exception:  # noqa: BLE001 - each job checks its own settings anyway
        return False


def check_settings(config: DictConfig) -> None:
    """The jobs' own settings check (:func:`bench.validate.validate_settings`) once, before the
    first job, when every job would make it on the same values: only ``method`` (or nothing the
    check reads) is swept, and the jobs run here. Then a bad setting is one ``error:`` line for
    the whole sweep, not one failed job per method; otherwise each job still checks its own."""
    from omegaconf import OmegaConf

    from bench.validate import SETTINGS_SECTIONS, read_config, validate_settings

    if not shared_by_every_job(config, SETTINGS_SECTIONS):
        return
    from bench.job import resolve_device

    cfg = read_config(OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]))
    validate_settings(cfg)
    resolve_device(cfg.device)  # device=mps, cuda without CUDA, cuda:N past the last GPU
    check_model_and_reducer(config, cfg)


def check_model_and_reducer(config: DictConfig, cfg: Any) -> None:
    """The image sizes against the model (:func:`check_image_sizes`) and, when every job also
    runs the same method at the same budget, its reducer on that weightless model
    (:func:`check_reducer`); ``cfg`` is the jobs' typed config, ``config`` the sweep's tree."""
    from omegaconf import OmegaConf

    model = check_image_sizes(cfg)
    if model is not None and shared_by_every_job(config, {"method", "budget"}):
        check_reducer(cfg, model, list(OmegaConf.select(config, "hydra.overrides.task", default=[]) or []))


def check_image_sizes(cfg: Any) -> Any:
    """``model.img_size`` and the scaling resolutions against the model's patch size, on the
    architecture built on the meta device (no weights): each job checks them on its model, after
    loading it. Returns that model, at the image size; None for a model that is not a timm ViT,
    left to the job, which names the problem."""
    import torch

    from bench.models import create_model, set_resolution
    from bench.validate import validate_for_model

    with torch.device("meta"):
        model = create_model(cfg.model.name)  # an unknown name: one line, as in the job
    if getattr(model, "patch_embed", None) is None:
        return None
    if cfg.model.img_size:
        set_resolution(model, int(cfg.model.img_size))
    validate_for_model(cfg, model)
    return model


def check_reducer(cfg: Any, model: Any, overrides: list[str]) -> None:
    """The job's reducer built, its budget solved and patched into the weightless ``model`` (all
    from shapes: :func:`bench.job.reduce_model`), when the sweep is that one job: a budget its
    knob cannot reach, a knob set beside a budget, blocks past the model's depth or a missing ω
    file are then one ``error:`` line before anything is loaded, as the job would say it. In a
    sweep over methods each job checks its own and fails alone. (A fine-tuned checkpoint is
    evaluated only with the method and budget it was trained at, which the job checks.)"""
    from bench.errors import BenchError
    from bench.job import reduce_model
    from methods import ReducerConfigError, UnsupportedModelError

    try:
        reduce_model(cfg, model, overrides)
    except (BenchError, ReducerConfigError, UnsupportedModelError):  # bad input: the job's one line, now
        raise
    except Exception:  # noqa: BLE001 - not bad input: the job meets it with its weights, and reports it
        return


class SweepSummary(Callback):
    """Checks the results folder, the settings every job shares and the sources before the
    first job; at the end prints the summary, lists skipped and failed jobs, regenerates the
    leaderboard and sets the exit status (2 when a job failed, whatever the leaderboard does; 1
    when only the leaderboard failed)."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.sweep_dir: str | None = None
        self.results_dir = "results/local"
        self.stats: dict[str, Any] = {}
        self.total: int | None = None
        self.started = time.perf_counter()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _ACTIVE
        from bench.errors import BenchError
        from bench.results_io import check_writable
        from methods import ReducerConfigError, UnsupportedModelError

        self.sweep_dir = os.path.abspath(str(config.hydra.sweep.dir))
        self.results_dir = str(config.results_dir)
        self.stats = dict(config.get("stats") or {})
        try:
            check_writable(self.results_dir)
            self.check_settings(config)
            check_sources(config)
        except (BenchError, ReducerConfigError, UnsupportedModelError) as e:  # Hydra would warn and go on
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        _ACTIVE = self
        self.started = time.perf_counter()
        self.total = count_jobs(config)
        self.bar = tqdm(
            total=self.total, desc="sweep", unit="job", position=0, disable=not config.get("progress", True)
        )

    def check_settings(self, config: DictConfig) -> None:
        """``bench.run``'s settings, once for the sweep where they are shared (:func:`check_settings`)."""
        check_settings(config)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from bench.errors import FAILURE_FILE, SKIP_FILE
        from bench.leaderboard import summary
        from bench.measure.phases import time_table

        if self.bar is not None:
            self.bar.close()
        with warnings.catch_warnings(record=True) as caught:  # shown once each, one line each
            warnings.simplefilter("always")
            try:
                records = self.sweep_records()
                print("\n" + summary(records))
                times = time_table(records)
                if times:
                    print("\n" + times)
            except Exception as e:  # noqa: BLE001 - a bad record must not hide the failures below
                print(f"\nno summary: {type(e).__name__}: {e}", file=sys.stderr)
            skipped = self.marked(SKIP_FILE)
            if skipped:
                print(f"\n{len(skipped)} job(s) skipped, already recorded (resume):")
                for job, text in skipped:
                    print(f"  {job}: {text}")
            leaderboard_ok = self.regenerate()
        print(f"\nsweep took {time.perf_counter() - self.started:.0f} s")
        for message in dict.fromkeys(str(w.message) for w in caught):
            print(f"warning: {message}", file=sys.stderr)
        failures = self.marked(FAILURE_FILE)
        if failures:
            print(f"\n{len(failures)} job(s) failed:", file=sys.stderr)
            for job, text in failures:
                print(f"  {job}: {text}", file=sys.stderr)
            sys.exit(2)
        if not leaderboard_ok:
            sys.exit(1)

    def sweep_records(self) -> list[dict[str, Any]]:
        from bench.store import read_run_records

        return [r for r in read_run_records(self.results_dir) if r.get("sweep_dir") == self.sweep_dir]

    def marked(self, filename: str) -> list[tuple[str, str]]:
        """(job folder, message) of this sweep's jobs that left ``filename``."""
        from bench.errors import unwritten_notes

        if self.sweep_dir is None:
            return []
        sweep = Path(self.sweep_dir)
        found = {f.parent.name: f.read_text().strip() for f in sweep.glob(f"*/{filename}")}
        found.update(unwritten_notes(sweep, filename))  # a full disk under the sweep folder
        return sorted(found.items())

    def regenerate(self) -> bool:
        """Rewrite the leaderboard from every record; False (and one line) when that failed. A
        results folder without records (every job failed) gets no empty leaderboard."""
        from bench.errors import BenchError
        from bench.leaderboard import write_leaderboard
        from bench.store import RUNS_FILE

        runs = Path(self.results_dir) / RUNS_FILE
        if not runs.exists() or runs.stat().st_size == 0:  # empty: the first append failed
            print(f"\nno records in {self.results_dir}; leaderboard not written")
            return True
        try:
            paths = write_leaderboard(self.results_dir, **self.stats)
        except BenchError as e:  # already one line that says what happened to the files
            print(f"\nerror: leaderboard not regenerated: {e}", file=sys.stderr)
            return False
        except Exception as e:  # noqa: BLE001 - reported in one line; the exit status says it failed
            print(
                f"\nerror: leaderboard not regenerated ({type(e).__name__}: {e}); previous files unchanged",
                file=sys.stderr,
            )
            return False
        print("\nleaderboard: " + ", ".join(str(p) for p in paths))
        return True


_ACTIVE: SweepSummary | None = None


def close_sweep_bar(clear: bool = False) -> None:
    """Close the sweep's bar (``clear``: wipe it, for a sweep that ends before its first job),
    so that the line saying why the sweep ended gets a line of its own."""
    if _ACTIVE is not None and _ACTIVE.bar is not None:
        if clear:
            _ACTIVE.bar.leave = False  # tqdm wipes a bar it does not leave
        _ACTIVE.bar.close()


INTERRUPT_LEADERBOARD_SECONDS = 60
"""How long Ctrl-C may spend regenerating the leaderboard before it gives up and exits."""


class _OutOfTime(Exception):
    pass


@contextmanager
def _time_limit(seconds: int):
    """Raise ``_OutOfTime`` in the main thread after ``seconds`` (POSIX ``SIGALRM``; elsewhere no
    limit). An interrupted sweep must always end: once (a test from a fresh clone), a Ctrl-C
    landing between two jobs left the process running for over two minutes without printing
    its line; rebuilding the leaderboard is the only step on this path that can take long."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise _OutOfTime(f"gave up after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def report_interrupt() -> int:
    """After Ctrl-C: one line saying what finished and how to resume, the leaderboard rebuilt
    from what was recorded; returns the exit status (130, as shells report SIGINT)."""
    from bench.errors import DONE_FILE

    sweep = _ACTIVE
    if sweep is None:
        print("interrupted; rerun the same command (add resume=true to skip what is recorded)", file=sys.stderr)
        return 130
    close_sweep_bar()
    done = [job for job, _ in sweep.marked(DONE_FILE)]
    where = "no records written"
    if done:
        try:
            with warnings.catch_warnings(), _time_limit(INTERRUPT_LEADERBOARD_SECONDS):
                warnings.simplefilter("ignore")
                from bench.leaderboard import write_leaderboard

                write_leaderboard(sweep.results_dir, **sweep.stats)
            where = f"recorded in {sweep.results_dir}, leaderboard regenerated"
        except (Exception, KeyboardInterrupt):  # noqa: BLE001 - the records are safe; say so and stop
            where = f"recorded in {sweep.results_dir} (leaderboard not regenerated)"
    total = f" of {sweep.total}" if sweep.total else ""
    finished = f" ({', '.join(done)})" if done else ""
    print(
        f"interrupted: {len(done)}{total} job(s) finished{finished}, {where}; "
        "rerun the same command with resume=true to run the rest",
        file=sys.stderr,
    )
    return 130
