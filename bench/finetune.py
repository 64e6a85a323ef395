"""Entry point: ``python -m bench.finetune method=fatr`` (the paper's recipe) or
``python -m bench.finetune method=none,fatr,tome finetune=quick loss=kd``.

Each method is fine-tuned at the budget ``bench.run`` evaluates it at, with the same recipe for
all, then evaluated as a ``bench.run`` job and recorded with its provenance. Several processes:
``torchrun --nproc_per_node N -m bench.finetune ...`` (gloo on CPU, NCCL on GPUs); the global
batch stays the recipe's, gradient accumulation fills what the processes do not.
Like ``bench.run``, bad input ends a job with one line and the sweep exits with status 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from bench.callbacks import SweepSummary
from bench.errors import record_failure
from bench.run import USER_ERRORS


def _main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


class FinetuneSummary(SweepSummary):
    """The sweep's progress bar, leaderboard and summary, from the main process only; the
    summary puts each fine-tuned method next to its off-the-shelf self and the control."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _main_process():
            super().on_multirun_start(config, **kwargs)

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
        print(f"error: {e}", file=sys.stderr)
        record_failure(str(e))
        return None


if __name__ == "__main__":
    main()
