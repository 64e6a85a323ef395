"""The project's one training loop: a reduced ViT (or only its reducer) learns from labels
and/or its own unreduced, frozen teacher.

Built from the ecosystem rather than copies of it: timm's optimizer and scheduler factories and
``ModelEmaV3``, torch AMP (bf16 on CUDA), DDP under ``torchrun``, gradient accumulation to reach
the recipe's global batch on a small machine. A checkpoint holds everything the next step
depends on (weights, optimizer, scheduler, EMA, every process's random state, and the step,
which is also the data position), so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from bench.errors import BenchError
from bench.store import config_hash
from bench.train.data import StepBatches
from bench.train.losses import check_loss, finetune_loss

TRAIN_MODES = ("all", "reducer", "norm")
STATE_FORMAT = "fatr-bench-train-state/1"
LAST = "last.pt"
METRICS = "metrics.jsonl"


@dataclass(frozen=True)
class Recipe:
    """How to train (the ``finetune`` config group plus ``loss`` and ``train``).

    Args:
        name: the preset's name, for the records.
        images: images to see in all (the schedule's length; a step sees ``batch_size``).
        batch_size: global batch per optimizer step, over all processes and accumulation.
        micro_batch: images per forward pass in one process (accumulation fills the rest).
        opt: timm optimizer name (``create_optimizer_v2``).
        lr: peak learning rate.
        weight_decay: decoupled weight decay (not applied to biases, norms and embeddings).
        sched: timm scheduler name (``create_scheduler_v2``, stepped per update), or ``none``.
        min_lr: the scheduler's floor.
        warmup_steps: linear warm-up updates.
        ema_decay: decay of the weights' moving average (``ModelEmaV3``); None: no EMA.
        eval_ema: evaluate the moving average rather than the last weights.
        loss: ``ce_kd`` (labels + the teacher), ``kd`` (the teacher only), ``ce`` (labels only).
        kd_weight: weight of the distillation term in ``ce_kd``.
        temperature: distillation temperature.
        label_smoothing: for the cross-entropy term.
        train: ``all`` weights, only the ``reducer``'s parameters, or ``norm`` (norms, biases
            and the reducer).
        clip_grad: max gradient norm, or None.
        amp: bf16 autocast on CUDA (the CPU always trains in float32).
        checkpoint_every: save a resumable checkpoint every this many steps.
        num_workers: data-loader processes per training process.
    """

    name: str
    images: int
    batch_size: int = 1024
    micro_batch: int = 128
    opt: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 2e-5
    sched: str = "cosine"
    min_lr: float = 1e-5
    warmup_steps: int = 0
    ema_decay: float | None = 0.9998
    eval_ema: bool = True
    loss: str = "ce_kd"
    kd_weight: float = 0.5
    temperature: float = 1.0
    label_smoothing: float = 0.0
    train: str = "all"
    clip_grad: float | None = None
    amp: bool = True
    checkpoint_every: int = 100
    num_workers: int = 0

    def __post_init__(self) -> None:
        check_loss(self.loss)
        if self.train not in TRAIN_MODES:
            raise BenchError(f"unknown train={self.train!r}; choose one of {', '.join(TRAIN_MODES)}")
        for key in ("images", "batch_size", "micro_batch", "checkpoint_every"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise BenchError(f"finetune.{key} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise BenchError(f"finetune.lr must be positive, got {self.lr}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise BenchError(f"finetune.ema_decay must be in (0, 1) or null, got {self.ema_decay}")

    @property
    def steps(self) -> int:
        return math.ceil(self.images / self.batch_size)


@dataclass(frozen=True)
class Dist:
    """This process's place in a ``torchrun`` launch (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def export_submitit_environment() -> None:
    """A job of Hydra's submitit launcher with several tasks (``hydra.launcher.tasks_per_node``,
    ``nodes``) and no ``torchrun``: describe the tasks as ``torchrun`` would (RANK, WORLD_SIZE...)."""
    if "WORLD_SIZE" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    if JobEnvironment().num_tasks > 1:
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group ``torchrun`` (or submitit) describes (gloo on CPU, NCCL on CUDA), once."""
    export_submitit_environment()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # rank 0 evaluates while the others wait at the next collective: allow for a long evaluation
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    return Dist(rank, world), device


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, after the checkpoint was saved: carries what was saved, so the
    entry point can say in one line where the run stands and how to continue it."""

    def __init__(self, checkpoint: Path | None, saved_step: int, step: int, steps: int) -> None:
        super().__init__(f"interrupted at step {step} of {steps}")
        self.checkpoint = checkpoint
        """``last.pt`` (None: nothing saved yet, or not by this process)."""
        self.saved_step = saved_step
        """The step ``checkpoint`` holds (resuming starts after it)."""
        self.step, self.steps = step, steps


@dataclass
class TrainResult:
    steps: int
    images_seen: int
    seconds: float
    trained_params: int
    model: nn.Module
    """The weights to evaluate: the moving average when the recipe evaluates it, else the last."""
    weights: str
    """``ema`` or ``last``: which of the two ``model`` is."""


def select_trainable(model: nn.Module, what: str) -> int:
    """Set ``requires_grad`` for ``train=what``; returns the number of trainable numbers."""
    reducer = getattr(model, "token_reducer", None)
    reducer_ids = {id(p) for p in reducer.parameters()} if reducer is not None else set()
    norm_ids = {
        id(p)
        for m in model.modules()
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or "Norm" in type(m).__name__
        for p in m.parameters(recurse=False)
    }
    count = 0
    for name, p in model.named_parameters():
        if what == "all":
            on = True
        elif what == "reducer":
            on = id(p) in reducer_ids
        else:
            on = id(p) in reducer_ids or id(p) in norm_ids or name.endswith(".bias")
        p.requires_grad_(on)
        count += p.numel() if on else 0
    if count == 0:
        name = type(reducer).__name__ if reducer is not None else "this model"
        raise BenchError(f"train={what}: {name} has no trainable parameters; use train=all or train=norm")
    return count


def forget_last_forward(model: nn.Module) -> None:
    """Drop the tokens a patched model keeps from its last forward (and their autograd graph)."""
    from methods.patch import is_patched, reduction_context

    if is_patched(model):
        reduction_context(model).state = None


# -- random state, checkpoints and the metrics log --------------------------------------------------


def rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: Any, path: Path) -> Path:
    """Write a file that is either complete or absent, whatever interrupts the write: a good
    checkpoint is replaced only by a complete one, so a full disk, a crash or Ctrl-C mid-save
    never leaves a truncated ``last.pt`` where the last good one was."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise BenchError(write_error(e, path)) from None
        raise
    return path


def write_error(e: OSError, path: Path) -> str:
    """One line for a failed write: what failed, that nothing good was lost, what to do."""
    kept = f"; the previous {path.name} is unchanged" if path.exists() else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"disk full: cannot save {path} ({e.strerror}){kept}; free space there and continue with "
            "resume=true (or start over on another disk with checkpoint_dir=PATH)"
        )
    return f"cannot save {path}: {e.strerror or e}{kept}"


@contextmanager
def finish_before_interrupt() -> Iterator[None]:
    """Hold Ctrl-C until the block is done, then raise it: an update interrupted halfway (the
    optimizer stepped, the EMA not) can be neither saved nor resumed, so Ctrl-C there would
    lose the step and leave no checkpoint. Only where Python's own handler is in place (the
    main thread); elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


def differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def start_over(path: Path) -> str:
    """What to do about a checkpoint that cannot be resumed (the end of each such error)."""
    return (
        f"delete it (or its folder {path.parent}) to start this configuration over, or point "
        "checkpoint_dir (finetune.out_dir) elsewhere"
    )


def load_train_state(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint to resume from, refused in one line when it is truncated, not ours, or
    another configuration wrote it (torch's own errors say neither which nor what to do)."""
    try:
        with warnings.catch_warnings():  # a foreign pickle warns before it fails
            warnings.simplefilter("ignore")
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any unreadable file means the same thing here
        raise BenchError(
            f"checkpoint {path} is truncated or corrupt (torch cannot read it): {start_over(path)}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise BenchError(f"{path} is not a bench.finetune checkpoint (another program's file?): {start_over(path)}")
    if state.get("identity_hash") != config_hash(identity):
        diff = differences(state.get("identity"), identity)
        shown = ", ".join(diff[:5]) + (f" (+{len(diff) - 5} more)" if len(diff) > 5 else "")
        raise BenchError(
            f"checkpoint {path} was written by another configuration (differs in: {shown}): "
            f"resume with that configuration, or {start_over(path)}"
        )
    return state


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines of steps after the checkpoint (they will be run again)."""
    keep = [r for r in read_metrics(path) if r["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, path)


# -- the loop -----------------------------------------------------------------------------------


class _Training:
    """One training run's objects, so that saving and resuming see the same ones."""

    def __init__(self, student, teacher, recipe, dist_: Dist, device, identity, seed) -> None:
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2
        from timm.utils import ModelEmaV3

        self.student, self.teacher, self.recipe, self.dist, self.device = student, teacher, recipe, dist_, device
        self.identity, self.seed = identity, seed
        self.trained = select_trainable(student, recipe.train)
        self.optimizer = create_optimizer_v2(student, recipe.opt, lr=recipe.lr, weight_decay=recipe.weight_decay)
        self.scheduler = None
        if recipe.sched != "none":
            self.scheduler, _ = create_scheduler_v2(
                self.optimizer,
                recipe.sched,
                num_epochs=recipe.steps,
                min_lr=recipe.min_lr,
                warmup_epochs=recipe.warmup_steps,
                step_on_epochs=False,
                updates_per_epoch=1,
            )
        forget_last_forward(student)  # the EMA copies the model; a lingering autograd graph cannot be copied
        self.ema = ModelEmaV3(student, decay=recipe.ema_decay) if recipe.ema_decay is not None else None
        self.forward = student
        if dist_.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.forward = DistributedDataParallel(student, device_ids=ids, find_unused_parameters=True)
        self.step = 0
        self.seconds = 0.0
        self.saved_step: int | None = None
        """The step ``last.pt`` holds (None: this run has none yet)."""
        self.updating = False
        """True while the weights, optimizer, scheduler and EMA are being updated (not a checkpoint)."""
        self.rng_next = rng_state()
        """The random state the next step starts from (a checkpoint's, with the last update's weights)."""

    def _reducer_loss(self) -> torch.Tensor | float:
        """A term the reducer adds to the training loss (DiffRate's schedule search: its MACs
        penalty ``λ·(GMACs − target)²``), or 0 for reducers without one."""
        student = getattr(self.student, "module", self.student)  # under DDP, the wrapped model
        extra = getattr(getattr(student, "token_reducer", None), "extra_loss", None)
        return extra() if extra is not None else 0.0

    def state(self, rngs: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "identity": self.identity,
            "identity_hash": config_hash(self.identity),
            "step": self.step,
            "images_seen": self.step * self.recipe.batch_size,
            "seconds": self.seconds,
            "model": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "rng": rngs,
        }

    def restore(self, state: dict[str, Any], path: Path) -> None:
        """Continue from ``state`` (read from ``path``); one line when it does not fit these objects
        (same configuration, other code: a reducer whose parameters changed, say)."""
        try:
            self.student.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            if self.ema is not None:
                self.ema.module.load_state_dict(state["ema"])
            rngs = state["rng"]
            set_rng_state(rngs[self.dist.rank % len(rngs)])
            self.step, self.seconds = state["step"], state["seconds"]
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise BenchError(
                f"checkpoint {path} does not fit this model and recipe ({first}): {start_over(path)}"
            ) from None
        self.saved_step = self.step

    def save(self, out_dir: Path, rng: dict[str, Any]) -> None:
        rngs = [rng]
        if self.dist.world > 1:
            rngs = [None] * self.dist.world
            dist.all_gather_object(rngs, rng)
        if self.dist.main:
            save_atomic(self.state(rngs), out_dir / LAST)
        if self.dist.world > 1:
            dist.barrier()
        self.saved_step = self.step

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def one_step(self, batches, accum: int) -> dict[str, float]:
        """Forward, backward and update on one global batch; returns the logged numbers."""
        r, device = self.recipe, self.device
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=r.amp and device.type == "cuda")
        self.optimizer.zero_grad(set_to_none=True)
        logged = torch.zeros(3, device=device)  # loss, ce, kd (averaged over the global batch)
        for k in range(accum):
            images, labels = next(batches)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            last = k == accum - 1
            sync = self.forward.no_sync() if self.dist.world > 1 and not last else nullcontext()
            with sync:
                with amp:
                    teacher = None
                    if r.loss != "ce":
                        with torch.no_grad():
                            teacher = self.teacher(images)
                    logits = self.forward(images)
                    loss, parts = finetune_loss(
                        r.loss, logits, labels, teacher, r.kd_weight, r.temperature, r.label_smoothing
                    )
                    loss = loss + self._reducer_loss()
                (loss / accum).backward()
            zero = loss.new_zeros(())
            logged += torch.stack([loss.detach(), parts.get("ce", zero), parts.get("kd", zero)]) / accum
        if r.clip_grad:
            torch.nn.utils.clip_grad_norm_([p for p in self.student.parameters() if p.requires_grad], r.clip_grad)
        lr = self.lr()
        with finish_before_interrupt():  # Ctrl-C lands before or after an update, never inside it
            self.updating = True
            self.optimizer.step()
            self.step += 1
            if self.scheduler is not None:
                self.scheduler.step_update(num_updates=self.step)
            if self.ema is not None:
                self.ema.update(self.student, step=self.step)
            self.updating = False
            self.rng_next = rng_state()
        if self.dist.world > 1:
            dist.all_reduce(logged)
            logged /= self.dist.world
        loss, ce, kd = logged.tolist()
        out = {"loss": loss, "lr": lr}
        if r.loss != "kd":
            out["ce"] = ce
        if r.loss != "ce":
            out["kd"] = kd
        return out


def train(
    student: nn.Module,
    teacher: nn.Module,
    dataset: torch.utils.data.Dataset,
    recipe: Recipe,
    out_dir: str | Path,
    identity: dict[str, Any],
    resume: bool = False,
    seed: int = 0,
    device: torch.device | None = None,
    dist_: Dist | None = None,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune ``student`` (a patched model: ``apply_reducer`` done) against ``teacher``.

    ``dataset[(epoch, index)]`` gives ``(image, label)``. ``out_dir`` receives ``last.pt`` (every
    ``recipe.checkpoint_every`` steps, at the end, and on Ctrl-C in a single process) and
    ``metrics.jsonl`` (one line per step). ``identity`` names the configuration: ``resume``
    refuses a checkpoint written by another one. Ctrl-C raises ``TrainingInterrupted`` (a
    ``KeyboardInterrupt``) once the checkpoint is saved; a save that fails (disk full) raises
    ``BenchError`` and leaves the previous ``last.pt`` as it was.
    """
    device = device or torch.device("cpu")
    dist_ = dist_ or Dist()
    out_dir = Path(out_dir)
    checkpoint, metrics_path = out_dir / LAST, out_dir / METRICS
    if checkpoint.exists() and not resume:
        raise BenchError(f"{checkpoint} exists: continue it with resume=true, or delete {out_dir} to start over")
    saved = load_train_state(checkpoint, identity) if resume and checkpoint.exists() else None

    torch.manual_seed(seed + dist_.rank)  # drop-path and any other randomness of the model
    teacher.eval().requires_grad_(False)
    student.train()
    run = _Training(student, teacher, recipe, dist_, device, identity, seed)
    if saved is not None:
        run.restore(saved, checkpoint)
    steps = recipe.steps
    if dist_.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if saved is not None and metrics_path.exists():
            _truncate_metrics(metrics_path, run.step)
        elif saved is None:
            metrics_path.write_text("")
    sampler = StepBatches(
        len(dataset), recipe.batch_size, recipe.micro_batch, dist_.world, dist_.rank, seed, run.step, steps
    )
    loader = torch.utils.data.DataLoader(  # its own generator: the global one belongs to the model (drop-path)
        dataset,
        batch_sampler=sampler,
        num_workers=recipe.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
    )
    batches = iter(loader)
    bar = tqdm(total=steps, initial=run.step, desc="fine-tuning", unit="step", disable=not (progress and dist_.main))
    log = open(metrics_path, "a") if dist_.main else None  # noqa: SIM115 - closed in finally
    run.rng_next = rng_state()  # the random state the first step starts from
    try:
        while run.step < steps:
            t0 = time.perf_counter()
            numbers = run.one_step(batches, sampler.accum)
            dt = time.perf_counter() - t0
            run.seconds += dt
            row = {
                "step": run.step,
                "images_seen": run.step * recipe.batch_size,
                "epoch": run.step * recipe.batch_size / len(dataset),
                **numbers,
                "img_per_s": recipe.batch_size / dt,
                "seconds": run.seconds,
            }
            if log is not None:
                log.write(json.dumps(row) + "\n")
                log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{row['img_per_s']:.1f}")
            if run.step % recipe.checkpoint_every == 0 or run.step == steps:
                run.save(out_dir, run.rng_next)
    except KeyboardInterrupt:
        # Between updates the weights, optimizer and EMA are those of the last completed step and
        # rng_next is the random state the interrupted step started from: together, a checkpoint.
        if dist_.world == 1 and not run.updating and run.step > (run.saved_step or 0):
            try:
                run.save(out_dir, run.rng_next)
            except BenchError as e:  # disk full: say so, and still stop as Ctrl-C asked
                print(f"error: {e}", file=sys.stderr)
        saved = run.saved_step if dist_.main else None
        raise TrainingInterrupted(checkpoint if saved is not None else None, saved or 0, run.step, steps) from None
    finally:
        bar.close()
        if log is not None:
            log.close()
    forget_last_forward(student)
    model = run.ema.module if run.ema is not None and recipe.eval_ema else student
    return TrainResult(
        steps=run.step,
        images_seen=run.step * recipe.batch_size,
        seconds=run.seconds,
        trained_params=run.trained,
        model=model.eval(),
        weights="ema" if model is not student else "last",
    )
