"""One fine-tuning job: one method at its budget, trained with one recipe, then evaluated as a
``bench.run`` job would be, and recorded with where its weights came from.

Every check on the user's input (folders, losses against labels, the budget, the recipe)
happens before the first training step, so a bad setting never costs a training run.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bench.allocator import keep_freed_memory
from bench.budget import solve_budget
from bench.config import Config
from bench.errors import BenchError
from bench.job import build_reducer_from_config, resolve_device, run_job
from bench.models import load_model, set_resolution
from bench.sources import check_trainable_weights, resolve_sources
from bench.store import config_hash, device_name
from bench.train.data import SeededImages, check_disjoint, list_train_images, train_transform
from bench.train.finetuned import read_finetuned, save_finetuned, save_reducer_state
from bench.train.losses import needs_labels
from bench.train.trainer import LAST, METRICS, Recipe, init_distributed, read_metrics, train
from bench.validate import check_finetune_run, check_finetune_settings, read_config, validate_settings
from methods import ReducerConfigError, apply_reducer
from methods.identity import NoReduction

FINAL = "final.pt"
REDUCER_FILE = "reducer.pt"
HOW = ("micro_batch", "num_workers", "checkpoint_every", "out_dir", "loss", "train")
"""Recipe settings that do not change the trained weights (or are recorded on their own)."""
CURVE_POINTS = 200


def make_recipe(cfg: DictConfig, n_images: int) -> Recipe:
    """The training loop's settings from the ``finetune`` group, ``loss`` and ``train``."""
    f = cfg.finetune
    images = f.images if f.images is not None else epoch_images(f.epochs, n_images)
    per_epoch = n_images / f.batch_size
    return Recipe(
        name=f.name,
        images=images,
        batch_size=f.batch_size,
        micro_batch=f.micro_batch,
        opt=f.opt,
        lr=float(f.lr),
        weight_decay=float(f.weight_decay),
        sched=str(f.sched),
        min_lr=float(f.min_lr),
        warmup_steps=round(f.warmup_epochs * per_epoch),
        ema_decay=None if f.ema_decay is None else float(f.ema_decay),
        eval_ema=bool(f.eval_ema),
        loss=cfg.loss,
        kd_weight=float(f.kd_weight),
        temperature=float(f.temperature),
        label_smoothing=float(f.label_smoothing),
        train=cfg.train,
        clip_grad=f.clip_grad,
        amp=bool(f.amp),
        checkpoint_every=f.checkpoint_every,
        num_workers=f.num_workers,
    )


def epoch_images(epochs: float, n_images: int) -> int:
    """Images a schedule of ``epochs`` passes over ``n_images`` trains on; a count that gives no
    image is refused naming ``finetune.epochs`` (the recipe would blame ``finetune.images``)."""
    images = round(epochs * n_images)
    if images < 1:
        raise BenchError(f"finetune.epochs={epochs} of {n_images} images is no image; raise it or set finetune.images")
    return images


def set_drop_path(model: nn.Module, rate: float) -> None:
    """Stochastic depth rising linearly to ``rate`` in the last block, as timm builds it."""
    from timm.layers import DropPath

    depth = len(model.blocks)
    for i, blk in enumerate(model.blocks):
        p = rate * i / max(depth - 1, 1)
        blk.drop_path1 = DropPath(p) if p > 0 else nn.Identity()
        blk.drop_path2 = DropPath(p) if p > 0 else nn.Identity()


EVALUATED = ("method", "model", "data", "budget", "bench", "results_dir", "device", "seed", "progress")
"""What the evaluation hands ``bench.run``'s job (:func:`evaluation_config`), with ``resume``."""


def check_evaluated_settings(cfg: DictConfig) -> Config:
    """The settings the evaluation will read, typed and checked as ``bench.run`` checks them,
    before anything trains, and fine-tuning's own (``resume``, ``data.train_limit``):
    ``finetune.yaml`` is a plain tree, so ``budget=0.5`` (a value for a section) was a traceback,
    and ``seed=-1`` or ``bench.latency.iters=0`` stopped the run only after training. One line,
    as ``bench.run`` says it. Returns the evaluation's typed config."""
    check_finetune_run(cfg)
    typed = read_config(evaluation_config(cfg, None, False))
    validate_settings(typed)
    return typed


def evaluation_config(cfg: DictConfig, checkpoint: Path | None, resume: bool) -> DictConfig:
    """The ``bench.run`` config that evaluates ``checkpoint`` (None: the method off the shelf).

    Built from the resolved tree as it is: a value given where a section belongs (``budget=0.5``)
    is passed on for :func:`bench.validate.read_config` to name, not tripped over here."""
    resolved = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    tree = {k: resolved[k] for k in EVALUATED if k in resolved}
    if isinstance(tree.get("data"), dict):  # the training images are fine-tuning's, not the evaluation's
        tree["data"] = {k: v for k, v in tree["data"].items() if not k.startswith("train_")}
    if checkpoint is not None:
        tree["model"]["checkpoint"] = str(checkpoint)
    if cfg.method.name == "none" and isinstance(tree.get("budget"), dict):
        tree["budget"]["macs_ratio"] = None  # the unreduced model has no budget: it is the reference
    return OmegaConf.create({**tree, "resume": resume})


def loss_curve(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """The per-step log in at most ``CURVE_POINTS`` consecutive bins (mean loss of each, at its
    last step), for the record: a summary the leaderboard can plot without the log file."""
    n = len(rows)
    edges = [i * n // CURVE_POINTS for i in range(CURVE_POINTS + 1)] if n > CURVE_POINTS else list(range(n + 1))
    bins = [rows[a:b] for a, b in zip(edges, edges[1:], strict=False) if b > a]
    return {
        "images_seen": [b[-1]["images_seen"] for b in bins],
        "loss": [sum(r["loss"] for r in b) / len(b) for b in bins],
    }


def run_finetune(cfg: DictConfig) -> dict[str, Any] | None:
    """Train, save, evaluate; returns the fine-tuned model's record (rank 0), else None."""
    keep_freed_memory()  # training steps on the CPU stop paying page faults too (bench/allocator.py)
    check_finetune_settings(cfg.finetune)  # finetune.lr=abc, batch_size=0: one line, before anything loads
    check_trainable_weights(cfg.model)  # random weights: refused before anything is loaded (its own reason first)
    check_evaluated_settings(cfg)  # budget=0.5, bench.latency.iters=abc: the same, not after training
    dist_, device = init_distributed(resolve_device(cfg.device))
    cfg = resolve_sources(cfg, announce=dist_.rank == 0)  # the teacher's weights and the eval images, said once
    method = cfg.method.name

    # -- every check before any training -----------------------------------------------------
    images = list_train_images(cfg.data.get("train_root"), needs_labels(cfg.loss), cfg.data.get("train_limit"))
    check_disjoint(images.root, cfg.data.root)
    recipe = make_recipe(cfg, len(images))
    reducer = build_reducer_from_config(cfg.method)
    if recipe.train == "reducer" and isinstance(reducer, NoReduction):
        raise BenchError("train=reducer: the unreduced model (method none) has no reducer parameters to train")
    eval_cfg = evaluation_config(cfg, None, True)
    recipe_id = {k: v for k, v in OmegaConf.to_container(cfg.finetune, resolve=True).items() if k not in HOW}
    tuned_identity = {
        "recipe": {**recipe_id, "loss": recipe.loss, "train": recipe.train, "images": recipe.images},
        "train_data": {"root": images.root, "images": len(images)},
        "seed": int(cfg.seed),
    }
    identity = {
        **tuned_identity,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "method": OmegaConf.to_container(eval_cfg.method),
        "budget": OmegaConf.to_container(eval_cfg.budget),
    }
    run_id = f"{method}-{config_hash(identity)}"
    out_dir = Path(cfg.finetune.out_dir or Path(cfg.checkpoint_dir) / run_id)
    final = out_dir / FINAL
    if final.exists() and not cfg.resume:
        raise BenchError(f"{final} exists (this configuration is trained): evaluate it with resume=true")

    # -- train ----------------------------------------------------------------------------------
    if not final.exists():
        student, teacher, reducer = _models(cfg, reducer, eval_cfg, device)
        if not (out_dir / LAST).exists() and dist_.main:
            print(f"[finetune] {method}: {recipe.steps} steps of {recipe.batch_size} images -> {out_dir}")
        f = cfg.finetune
        dataset = SeededImages(images, train_transform(student, f.augment, f.auto_augment, f.re_prob), cfg.seed)
        result = train(
            student, teacher, dataset, recipe, out_dir, identity, cfg.resume, int(cfg.seed), device, dist_, cfg.progress
        )
        if dist_.main:
            rows = read_metrics(out_dir / METRICS)
            provenance = {
                "recipe_name": recipe.name,
                "recipe": tuned_identity["recipe"],
                "recipe_hash": config_hash(tuned_identity),
                "loss": recipe.loss,
                "trained": recipe.train,
                "trained_params": result.trained_params,
                "train_root": images.root,
                "train_images": len(images),
                "images_seen": result.images_seen,
                "steps": result.steps,
                "seconds": result.seconds,
                "device": device_name(device),
                "processes": dist_.world,
                "weights": result.weights,
                "img_per_s": result.images_seen / result.seconds if result.seconds else None,
                "loss_curve": loss_curve(rows),
            }
            meta = {k: identity[k] for k in ("model", "method", "budget")}
            save_finetuned(final, result.model, {**meta, "identity": tuned_identity, "provenance": provenance})
            if recipe.train == "reducer":  # small, and all that changed: what omega_path loads
                save_reducer_state(out_dir / REDUCER_FILE, result.model, {**reducer.hparams, **provenance})
            (out_dir / LAST).unlink(missing_ok=True)  # final.pt holds everything a later run needs
            from bench.report.finetuned import plot_loss_curve

            plot = plot_loss_curve(rows, Path(cfg.results_dir) / "finetune" / f"{run_id}.png", _title(cfg, recipe))
            print(f"[finetune] {method}: saved {final}; loss curve {plot}")
        if dist_.world > 1:
            torch.distributed.barrier()
    if not dist_.main:
        return None

    # -- evaluate like bench.run ----------------------------------------------------------------
    if read_finetuned(final) is None:
        raise BenchError(f"{final} is not a readable fine-tuned checkpoint; delete {out_dir} to train again")
    if method != "none":
        run_job(eval_cfg)  # the same method off the shelf (skipped when already recorded)
    return run_job(evaluation_config(cfg, final, bool(cfg.resume)))


def _models(cfg: DictConfig, reducer, eval_cfg: DictConfig, device: torch.device):
    """The frozen unreduced teacher, and the student: a copy with the reducer at its budget."""
    m = cfg.model
    torch.manual_seed(cfg.seed)  # anything the model or reducer draws: the same in every process
    teacher = load_model(m.name, m.checkpoint, m.pretrained, random_init=m.get("random_init", False))
    if m.get("img_size"):
        set_resolution(teacher, int(m.img_size))
    student = copy.deepcopy(teacher)
    set_drop_path(student, float(cfg.finetune.drop_path))
    budget = eval_cfg.budget
    reducer, _ = solve_budget(reducer, budget.macs_ratio, budget.tolerance, student, cfg.method.name)
    try:
        apply_reducer(student, reducer)
    except ReducerConfigError as e:
        raise BenchError(f"method {cfg.method.name}: {e}") from None
    return student.to(device), teacher.to(device), reducer


def _title(cfg: DictConfig, recipe: Recipe) -> str:
    budget = "" if cfg.method.name == "none" else f" at MACs {cfg.budget.macs_ratio}"
    return (
        f"{cfg.method.name}{budget}: recipe {recipe.name}, loss {recipe.loss}, train {recipe.train}, "
        f"{math.ceil(recipe.images)} images"
    )
