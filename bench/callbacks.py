"""Hydra callbacks: a sweep-level progress bar, the leaderboard, and one summary table."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from tqdm.auto import tqdm


def count_jobs(config: DictConfig) -> int | None:
    """Number of jobs the basic sweeper will launch, from the command-line and config sweeps."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        overrides = list(config.hydra.overrides.task)
        params = config.hydra.sweeper.get("params") or {}
        overrides += [f"{k}={v}" for k, v in params.items()]
        parsed = OverridesParser.create().parse_overrides(overrides)
        sizes: dict[str, int] = {}
        for o in parsed:
            if o.is_sweep_override():
                sizes[o.get_key_element()] = len(list(o.sweep_string_iterator()))
        return math.prod(sizes.values()) if sizes else 1
    except Exception:  # noqa: BLE001 - a progress total is nice to have, never worth failing for
        return None


class SweepSummary(Callback):
    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.sweep_dir: str | None = None
        self.results_dir = "results/local"
        self.stats: dict[str, Any] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = str(config.hydra.sweep.dir)
        self.results_dir = str(config.results_dir)
        self.stats = dict(config.get("stats") or {})
        self.bar = tqdm(
            total=count_jobs(config), desc="sweep", unit="job", position=0, disable=not config.get("progress", True)
        )

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from bench.errors import FAILURE_FILE
        from bench.leaderboard import summary, write_leaderboard
        from bench.store import read_records

        if self.bar is not None:
            self.bar.close()
        records = [r for r in read_records(self.results_dir) if r.get("sweep_dir") == self.sweep_dir]
        paths = write_leaderboard(self.results_dir, **self.stats)
        print("\n" + summary(records))
        print("\nleaderboard: " + ", ".join(str(p) for p in paths))
        failures = sorted(Path(self.sweep_dir).glob(f"*/{FAILURE_FILE}"))
        if failures:
            print(f"\n{len(failures)} job(s) failed:", file=sys.stderr)
            for f in failures:
                print(f"  {f.parent.name}: {f.read_text().strip()}", file=sys.stderr)
            sys.exit(2)
