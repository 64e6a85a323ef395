"""Helpers for harness tests: a tiny labelled image folder, a file of random weights and fast
hydra configs."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from bench.data import synsets

REPO = Path(__file__).resolve().parents[1]
RANDOM_MODEL = "deit_tiny_patch16_224"


def random_weights_file(name: str = RANDOM_MODEL, seed: int = 0) -> Path:
    """A safetensors file of ``name`` with random weights (``torch.manual_seed(seed)``), made once
    per machine in the temp folder.

    Harness tests measure accuracy, which ``bench.run`` refuses on ``model.random_init=true``:
    a real file of random weights runs the whole pipeline quickly and the same in every process
    (pytest workers, CLI subprocesses). It is written under a temporary name and moved into
    place, so a concurrent reader sees either no file or the whole one."""
    import timm

    folder = Path(tempfile.gettempdir()) / "fatr-bench-tests"
    path = folder / f"{name}-timm{timm.__version__}-random-seed{seed}.safetensors"  # another timm: other keys
    if path.is_file():
        return path
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(name)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would lock other users of the machine out
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


RANDOM_WEIGHTS = random_weights_file()

FAST = [
    f"model.checkpoint={RANDOM_WEIGHTS}",
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


def compose(overrides: list[str], config_name: str = "config"):
    """``bench/conf/config.yaml`` composed with ``overrides``, as ``bench.run`` gets it (typed by
    the schema in :mod:`bench.config`); ``config_name="finetune"``: as ``bench.finetune`` gets it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import bench.config  # noqa: F401  registers the schema the config's defaults list names

    with initialize_config_dir(config_dir=str(REPO / "bench" / "conf"), version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides)


def run_cli(
    args: list[str], tmp: Path, env: dict | None = None, timeout: int = 600, module: str = "bench.run"
) -> subprocess.CompletedProcess:
    e = {**os.environ, "FATR_RESULTS_DIR": str(tmp / "results"), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args, f"hydra.sweep.dir={tmp}/sweep"],
        cwd=REPO,
        env=e,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
