"""Training throughput of each method under a fine-tuning recipe:
``python -m bench.train_throughput method=none,fatr,tome finetune=paper data.train_root=PATH``.

Why a separate measurement: ``bench.finetune``'s img/s includes decoding and augmentation,
which on a GPU machine bound it long before the model does, so it cannot tell methods apart.
Here one global batch of real training images (the recipe's transform) is decoded once and
kept on the device; the optimizer step (teacher forward, student forward and backward,
accumulation, update, EMA) is timed alone, the same way for every method and the unreduced
control. Nothing is saved: the weights are thrown away.

Overrides are those of ``bench.finetune`` plus ``steps`` (timed updates, default 20) and
``warmup`` (untimed updates first, default 3); ``out=FILE`` appends one JSON line per method.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.errors import BenchError
from bench.finetune_job import _models, evaluation_config, make_recipe
from bench.job import build_reducer_from_config, resolve_device
from bench.sources import resolve_sources
from bench.store import device_name, now_iso
from bench.train.data import SeededImages, list_train_images, train_transform
from bench.train.losses import needs_labels
from bench.train.trainer import Dist, _Training

OWN_KEYS = ("steps", "warmup", "out")


def _split(argv: list[str]) -> tuple[list[str], list[str], dict[str, str]]:
    """Methods (``method=a,b``), the other Hydra overrides, and this tool's own settings."""
    methods, overrides, own = ["fatr"], [], {}
    for arg in argv:
        key, _, value = arg.partition("=")
        if key == "method":
            methods = [m for m in value.split(",") if m]
        elif key in OWN_KEYS:
            own[key] = value
        else:
            overrides.append(arg)
    return methods, overrides, own


def _config(method: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(Path(__file__).parent / "conf"), version_base=None):
        return compose("finetune", overrides=[f"method={method}", *overrides])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(method: str, overrides: list[str], steps: int, warmup: int) -> dict[str, Any]:
    """Updates per second of ``method`` under the composed recipe, images already on the device."""
    cfg = _config(method, overrides)
    device = resolve_device(cfg.device)
    cfg = resolve_sources(cfg, images=False)  # the teacher's weights, in bench.run's order
    images = list_train_images(cfg.data.get("train_root"), needs_labels(cfg.loss), cfg.data.get("train_limit"))
    recipe = make_recipe(cfg, len(images))
    reducer = build_reducer_from_config(cfg.method)
    student, teacher, reducer = _models(cfg, reducer, evaluation_config(cfg, None, True), device)
    dataset = SeededImages(images, train_transform(student, cfg.finetune.augment, cfg.finetune.auto_augment), 0)
    n = recipe.micro_batch
    picked = [dataset[(0, i % len(dataset))] for i in range(n)]
    x = torch.stack([p[0] for p in picked]).to(device)
    y = torch.tensor([max(p[1], 0) for p in picked], device=device)

    def batches():
        while True:
            yield x, y

    teacher.eval().requires_grad_(False)
    student.train()
    run = _Training(student, teacher, recipe, Dist(), device, {}, int(cfg.seed))
    accum = recipe.batch_size // recipe.micro_batch
    stream = batches()
    for _ in range(warmup):
        run.one_step(stream, accum)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        run.one_step(stream, accum)
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "method": method,
        "macs_ratio": None if method == "none" else cfg.budget.macs_ratio,
        "recipe": recipe.name,
        "batch_size": recipe.batch_size,
        "micro_batch": recipe.micro_batch,
        "amp": bool(recipe.amp and device.type == "cuda"),
        "loss": recipe.loss,
        "train": recipe.train,
        "steps": steps,
        "seconds": seconds,
        "img_per_s": steps * accum * n / seconds,
        "peak_gib": peak,
        "device": device_name(device),
        "timestamp": now_iso(),
    }


def _counts(own: dict[str, str]) -> tuple[int, int]:
    try:
        steps, warmup = int(own.get("steps", 20)), int(own.get("warmup", 3))
    except ValueError:
        raise BenchError(f"steps and warmup must be integers, got {own}") from None
    if steps < 1 or warmup < 0:
        raise BenchError(f"steps must be >= 1 and warmup >= 0, got steps={steps} warmup={warmup}")
    return steps, warmup


def main(argv: list[str]) -> int:
    from hydra.errors import HydraException

    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    methods, overrides, own = _split(argv)
    try:
        flags = [a for a in argv if a.startswith("-")]
        if flags:
            raise BenchError(
                f"{flags[0]}: this tool takes key=value overrides, not flags (those of bench.finetune, e.g. "
                "finetune.batch_size=64, and steps, warmup, out); see --help"
            )
        steps, warmup = _counts(own)
        rows = []
        for method in methods:
            row = measure(method, overrides, steps, warmup)
            rows.append(row)
            print(
                f"{method:>8}: {row['img_per_s']:8.1f} img/s  ({row['steps']} updates of {row['batch_size']}, "
                f"micro-batch {row['micro_batch']}, amp {row['amp']}, {row['device']})",
                flush=True,
            )
            if "out" in own:
                with open(Path(own["out"]), "a") as f:
                    f.write(json.dumps(row) + "\n")
        base = next((r for r in rows if r["method"] == "none"), None)
        if base is not None:
            for r in rows:
                print(f"{r['method']:>8}: {r['img_per_s'] / base['img_per_s']:.2f}x the unreduced model's throughput")
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except HydraException as e:  # a malformed override or an unknown config option
        from bench.validate import unknown_group_option

        named = unknown_group_option(e)  # method=nope: the options the group has, as bench.run says it
        why = str(named) if named else f"{str(e).splitlines()[0]} (overrides are those of bench.finetune; see --help)"
        print(f"error: {why}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
