"""Entry point: ``python -m bench.finetune method=fatr`` (the paper's recipe) or
``python -m bench.finetune method=none,fatr,tome finetune=quick loss=kd``.

Each method is fine-tuned at the budget ``bench.run`` evaluates it at, with the same recipe for
all, then evaluated as a ``bench.run`` job and recorded with its provenance. Several processes:
``torchrun --nproc_per_node N -m bench.finetune ...`` (gloo on CPU, NCCL on GPUs); the global
batch stays the recipe's, gradient accumulation fills what the processes do not.
Like ``bench.run``, bad input ends a job with one line and the sweep exits with status 2;
Ctrl-C saves the training state and ends with one line giving the exact command that
continues (this one with ``resume=true``), status 130.
"""

from __future__ import annotations

import errno
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from bench.callbacks import SweepSummary
from bench.errors import record_failure
from bench.run import USER_ERRORS, config_errors_in_one_line


def _main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


class FinetuneSummary(SweepSummary):
    """The sweep's progress bar, leaderboard and summary, from the main process only; the
    summary puts each fine-tuned method next to its off-the-shelf self and the control."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _main_process():
            super().on_multirun_start(config, **kwargs)

    def check_settings(self, config: DictConfig) -> None:
        """The recipe's values, and the settings the evaluation will read, once for the sweep
        where every job shares them (each job checks its own where they are swept or the jobs
        run elsewhere)."""
        from bench.callbacks import check_model_and_reducer, shared_by_every_job
        from bench.finetune_job import check_evaluated_settings
        from bench.sources import check_trainable_weights
        from bench.validate import SETTINGS_SECTIONS, check_finetune_settings

        if shared_by_every_job(config, {"finetune"}):
            check_finetune_settings(config.finetune)
        if shared_by_every_job(config, SETTINGS_SECTIONS | {"data"}):  # budget=0.5: once, not once per method
            check_trainable_weights(config.model)
            check_model_and_reducer(config, check_evaluated_settings(config))

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if _main_process():
            super().on_job_end(config, job_return, **kwargs)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not _main_process():
            return
        from bench.errors import FAILURE_FILE
        from bench.leaderboard import latest_per_config, write_leaderboard
        from bench.report.finetuned import finetuned_rows
        from bench.store import read_records

        if self.bar is not None:
            self.bar.close()
        records = latest_per_config(read_records(self.results_dir))
        mine = {r.get("config_hash") for r in records if r.get("sweep_dir") == self.sweep_dir}
        if mine:  # a sweep that recorded nothing leaves the results alone
            paths = write_leaderboard(self.results_dir)
            df = finetuned_rows(records, Path(self.results_dir))
            df = df[df["config_hash"].isin(mine)] if not df.empty else df
            if not df.empty:

                def paired(iv: Any) -> str:  # Δ with its 95% interval paired over images
                    return "–" if iv is None else f"{iv.estimate:+.2f} [{iv.low:+.2f}, {iv.high:+.2f}]"

                df = df.assign(d_control=df["d_control"].map(paired), d_shelf=df["d_shelf"].map(paired))
                cols = ["label", "budget", "top1", "d_control", "d_shelf", "agreement", "steps"]
                names = {"d_control": "Δ control [95%]", "d_shelf": "Δ off-the-shelf [95%]"}
                table = df[cols].rename(columns=names).to_string(index=False, float_format=lambda v: f"{v:.2f}")
                print("\n" + table)
            print("\nleaderboard: " + ", ".join(str(p) for p in paths))
        failures = sorted(Path(self.sweep_dir).glob(f"*/{FAILURE_FILE}"))
        if failures:
            print(f"\n{len(failures)} job(s) failed:", file=sys.stderr)
            for f in failures:
                print(f"  {f.parent.name}: {f.read_text().strip()}", file=sys.stderr)
            sys.exit(2)


@hydra.main(version_base="1.3", config_path="conf", config_name="finetune")
def main(cfg: DictConfig) -> dict | None:
    from bench.finetune_job import run_finetune

    try:
        return run_finetune(cfg)
    except USER_ERRORS as e:
        return _fail(str(e))
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {e.filename}" if e.filename else ""  # the metrics log, a plot, the results
        return _fail(f"disk full{where} ({e.strerror}); free space and continue with resume=true")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    record_failure(message)
    return None


def resume_command(argv: list[str], env: dict[str, str] | None = None) -> str:
    """The command that continues this one: its overrides with ``resume=true`` (in place of
    any ``resume=`` given), under ``torchrun`` when it ran under one."""
    env = os.environ if env is None else env
    args = [a for a in argv if a.split("=", 1)[0].lstrip("+~") != "resume"]
    launcher = "python"
    world, local = env.get("WORLD_SIZE", "1"), env.get("LOCAL_WORLD_SIZE", "")
    if world != "1":
        launcher = f"torchrun --nproc_per_node {local}" if local == world else "torchrun <your launch options>"
    return f"{launcher} {shlex.join(['-m', 'bench.finetune', *args, 'resume=true'])}"


def report_interrupt(exc: KeyboardInterrupt, argv: list[str] | None = None) -> int:
    """After Ctrl-C: one line (main process only) saying what training saved and the exact
    command that continues; returns 130, as shells report SIGINT. No leaderboard rebuild: a
    job records only after its evaluation, and rerunning the command finishes that."""
    from bench import callbacks
    from bench.train.trainer import TrainingInterrupted

    sweep = callbacks._ACTIVE
    if sweep is not None and sweep.bar is not None:
        sweep.bar.close()
    if not _main_process():
        return 130
    where = "interrupted"
    if isinstance(exc, TrainingInterrupted):
        saved = f"step {exc.saved_step} saved to {exc.checkpoint}" if exc.checkpoint else "no checkpoint yet"
        where = f"interrupted at step {exc.step} of {exc.steps} ({saved})"
    command = resume_command(sys.argv[1:] if argv is None else argv)
    print(f"{where}; continue with: {command}", file=sys.stderr)
    return 130


def cli() -> None:
    """``python -m bench.finetune``: Hydra's main, with Ctrl-C turned into one line and status 130."""
    try:
        with config_errors_in_one_line():  # model=deit_huge, finetune=nope: one line, as bench.run
            main()
    except KeyboardInterrupt as e:
        sys.exit(report_interrupt(e))


if __name__ == "__main__":
    cli()
