"""Helpers for harness tests: a tiny labelled image folder and fast hydra configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from bench.data import synsets

REPO = Path(__file__).resolve().parents[1]

FAST = [
    "model.random_init=true",
    "model.checkpoint=null",
    "data.batch_size=4",
    "bench.latency.batch_size=2",
    "bench.latency.warmup=0",
    "bench.latency.iters=2",
    "bench.latency.tolerance=null",  # a fixed count: adaptive timing is tested with a fake clock
    "bench.spectral.images=2",
    "bench.scaling.resolutions=[224,256]",
    "bench.scaling.iters=1",
    "bench.scaling.warmup=0",
    "bench.scaling.batch_tokens=1",
    "progress=false",
]


def image_folder(root: Path, n_classes: int = 3, per_class: int = 2) -> Path:
    """Real JPEG files in the val layout, classes spread over the synset list."""
    names = synsets()
    for c in range(n_classes):
        d = root / names[c * 331]
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.effect_mandelbrot((96, 80), (-2 + c * 0.3, -1.2, 0.8, 1.2 + i * 0.1), 40 + 10 * i)
            img.convert("RGB").save(d / f"img_{c}_{i}.JPEG")
    return root


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "bench" / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def run_cli(args: list[str], tmp: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    e = {**os.environ, "FATR_RESULTS_DIR": str(tmp / "results"), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "bench.run", *args, f"hydra.sweep.dir={tmp}/sweep"],
        cwd=REPO,
        env=e,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
