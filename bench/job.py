"""One benchmark job: one method, one budget, every enabled measurement, one record.

Jobs that run in the same process (Hydra's basic launcher) share the loaded weights, the
decoded images and the unreduced baseline, so a sweep spends its time in the models.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from bench.accuracy import Predictions, accuracy_metrics, predict
from bench.budget import solve_budget
from bench.cache import MeasurementCache, unreduced_cache
from bench.data import ImageSet, load_imagenet_folder
from bench.errors import BenchError, record_skip
from bench.finetuned import Finetuned, resolve_finetuned, swap_in
from bench.flops import macs_report
from bench.latency import measure_latency, unreduced_latency
from bench.models import load_model, set_resolution
from bench.outcomes import Outcomes, outcomes_of, save_outcomes
from bench.phases import PhaseClock
from bench.report_stats import check_options
from bench.results_io import check_writable
from bench.store import append_record, config_hash, device_name, git_commit, now_iso, read_records, recorded_hashes
from bench.terminal import say
from bench.validate import validate_for_model, validate_settings
from methods import ReducerConfigError, TokenReducer, apply_reducer, remove_reducer
from methods.identity import NoReduction

_BASELINES: dict[tuple, Baseline] = {}


@dataclass
class Baseline:
    preds: Predictions | None
    metrics: dict[str, Any]
    cfg: DictConfig
    recorded: bool
    """Whether its record is in the store: it is appended only once a job using it has finished."""
    cache: MeasurementCache | None = None
    """The unreduced model's measurements on disk (predictions, spectral reference, scaling)."""
    seconds: float = 0.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise BenchError(f"device={name} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
    return dev


def build_reducer_from_config(method_cfg: DictConfig) -> TokenReducer:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if "reducer" not in method_cfg or "_target_" not in method_cfg.reducer:
        raise BenchError("method config needs a 'reducer' with a '_target_' class")
    try:
        reducer = instantiate(method_cfg.reducer, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__ or e
        raise BenchError(f"cannot build method {method_cfg.get('name')!r}: {cause}") from None
    if not isinstance(reducer, TokenReducer):
        raise BenchError(f"{method_cfg.reducer._target_} is not a TokenReducer subclass")
    return reducer


def job_identity(cfg: DictConfig, finetuned: Finetuned | None = None) -> dict[str, Any]:
    """What determines a job's numbers: the key for resume and for 'latest per config'."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    data["root"] = str(Path(data["root"]).expanduser().resolve())
    identity = {
        "method": OmegaConf.to_container(cfg.method, resolve=True),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data": data,
        "budget": OmegaConf.to_container(cfg.budget, resolve=True),
        "bench": OmegaConf.to_container(cfg.bench, resolve=True),
        "device": str(resolve_device(cfg.device)),
    }
    if finetuned is not None:  # fine-tuned weights: another model than the base they started from
        identity["finetuned"] = finetuned.identity
    return identity


def flop_metrics(model: nn.Module, reducer: TokenReducer, data: ImageSet, device: torch.device) -> dict[str, Any]:
    """fvcore and analytic GMACs per image (they must agree within 2%), and parameters."""
    report: dict[str, Any] = macs_report(model, reducer, data.images[:1].to(device))
    report["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    return report


def measure(
    cfg: DictConfig,
    model: nn.Module,
    reducer: TokenReducer,
    data: ImageSet,
    device: torch.device,
    base: Baseline | None,
    clock: PhaseClock | None = None,
    cache: MeasurementCache | None = None,
) -> tuple[dict[str, Any], Predictions | None]:
    """Every enabled measurement of one patched model; relative numbers against ``base``.

    The unreduced model (``base`` None) takes its predictions and FLOPs from ``cache`` when it
    can and is not timed here: its latency is the one measured in alternation with the first reduced
    job (see :func:`run_job`). Each phase's seconds accumulate in ``clock``."""
    name = cfg.method.name if base is not None else "unreduced"
    clock = clock or PhaseClock()
    metrics: dict[str, Any] = {}
    preds = None
    if cfg.bench.accuracy:
        t0 = time.perf_counter()
        with clock.phase("accuracy"):
            if base is None and cache is not None:
                preds = cached_predictions(cache, model, data, cfg, device)
            else:
                preds = predict(model, data.images, cfg.data.batch_size, device, name, cfg.progress)
        metrics["accuracy_seconds"] = time.perf_counter() - t0
        metrics.update(accuracy_metrics(preds, data.labels, base.preds if base else None))
        if base is not None:
            metrics["baseline_top1"] = base.metrics["top1"]
            metrics["delta_top1"] = metrics["top1"] - base.metrics["top1"]
    if cfg.bench.flops:
        with clock.phase("flops"):
            if base is None and cache is not None:
                metrics.update(cache.get_or_compute("flops", {}, lambda: flop_metrics(model, reducer, data, device))[0])
            else:
                metrics.update(flop_metrics(model, reducer, data, device))
        if base is not None:
            metrics["baseline_gmacs"] = base.metrics["gmacs"]
            metrics["macs_ratio"] = metrics["gmacs"] / base.metrics["gmacs"]
    if cfg.bench.latency.enabled and base is not None:
        lat = cfg.bench.latency
        x = data.images[: lat.batch_size]
        if len(x) < lat.batch_size:
            x = x.repeat((lat.batch_size + len(x) - 1) // len(x), 1, 1, 1)[: lat.batch_size]
        reference = model_without_reducer(model)
        with clock.phase("latency"):
            metrics.update(
                measure_latency(
                    model,
                    reference,
                    x.to(device),
                    lat.warmup,
                    lat.iters,
                    lat.amp,
                    lat.threads,
                    cfg.progress,
                    tolerance=lat.get("tolerance"),
                    max_seconds=lat.get("max_seconds"),
                    max_iters=lat.get("max_iters") or 200,
                )
            )
        if metrics["latency_busy"]:
            say(f"warning: {name}: latency measured on a busy machine ({metrics['latency_busy_reason']})")
        if "macs_ratio" in metrics:
            # 1.0 = latency fell exactly as much as MACs did
            metrics["speedup_efficiency"] = metrics["speedup"] * metrics["macs_ratio"]
    if base is not None:  # relative analyses of a reduced model; the unreduced one is their reference
        from bench.extras import scaling_job, spectral_job

        with clock.phase("spectral"):
            metrics.update(spectral_job(cfg, model, reducer, data, device, base.cache))
        with clock.phase("scaling"):
            metrics.update(scaling_job(cfg, model, reducer, data, device, base.cache))
        if metrics.get("scaling_busy"):
            say(f"warning: {name}: scaling latency measured on a busy machine ({metrics['scaling_busy_reason']})")
    return metrics, preds


def cached_predictions(
    cache: MeasurementCache, model: nn.Module, data: ImageSet, cfg: DictConfig, device: torch.device
) -> Predictions:
    """The unreduced model's predictions, from the measurement cache or measured (and stored)."""
    settings = {"batch_size": cfg.data.batch_size}

    def compute() -> dict[str, Any]:
        return {"top5": predict(model, data.images, cfg.data.batch_size, device, "unreduced", cfg.progress).top5}

    stored, _ = cache.get_or_compute("predictions", settings, compute)
    return Predictions(stored["top5"])


def baseline(cfg: DictConfig, model: nn.Module, data: ImageSet, device: torch.device) -> Baseline:
    """The unreduced model on the same images: measured once per process, and recorded by the
    first job that finishes with it (see :func:`run_job`), so a failing job records nothing.
    Its predictions come from the measurement cache when they were measured before (any
    sweep, same weights, images, device and settings). With ``resume=true`` a stored
    unreduced record is reused, not measured or appended again; its predictions come from the
    cache or are recomputed (agreement needs them, records do not hold them)."""
    key = (str(cfg.model), str(cfg.data), str(device), str(cfg.bench))
    if key not in _BASELINES:
        base_cfg = cfg.copy()
        with open_dict(base_cfg):
            base_cfg.method = OmegaConf.create(
                {"name": "none", "reducer": {"_target_": "methods.identity.NoReduction"}}
            )
            base_cfg.budget.macs_ratio = None
        t0 = time.perf_counter()
        plain = model_without_reducer(model)
        cache = unreduced_cache(cfg.results_dir, plain, cfg.model, data, device, enabled=cfg.get("cache", True))
        stored = _stored_baseline(cfg, base_cfg)
        preds = None
        if stored is not None and cfg.bench.accuracy:
            preds = cached_predictions(cache, plain, data, cfg, device)
            top1 = accuracy_metrics(preds, data.labels)["top1"]
            if top1 != stored["top1"]:
                say(
                    f"warning: the stored unreduced record (top-1 {stored['top1']:.2f}) does not match this "
                    f"run's unreduced model (top-1 {top1:.2f}); measuring it again"
                )
                stored = None
        if stored is not None:
            _BASELINES[key] = Baseline(preds, stored, base_cfg, recorded=True, cache=cache)
        else:
            own = PhaseClock()
            metrics, preds = measure(cfg, plain, NoReduction(), data, device, None, own, cache)
            metrics["seconds_by_phase"] = own.record()
            _BASELINES[key] = Baseline(preds, metrics, base_cfg, recorded=False, cache=cache)
        _BASELINES[key].seconds = time.perf_counter() - t0
    return _BASELINES[key]


def _stored_baseline(cfg: DictConfig, base_cfg: DictConfig) -> dict[str, Any] | None:
    """With ``resume=true``, the metrics of the newest stored unreduced record for these settings
    (if it holds what the reduced jobs compare against)."""
    if not cfg.resume:
        return None
    digest = config_hash(job_identity(base_cfg))
    need = (["top1"] if cfg.bench.accuracy else []) + (["gmacs"] if cfg.bench.flops else [])
    for r in reversed(read_records(cfg.results_dir)):
        m = r.get("metrics")
        if r.get("config_hash") == digest and isinstance(m, dict) and all(k in m for k in need):
            return m
    return None


def _record(
    cfg: DictConfig,
    reducer: TokenReducer,
    budget: dict[str, Any],
    data: ImageSet,
    device: torch.device,
    metrics: dict[str, Any],
    seconds: float,
    outcomes: Outcomes | None = None,
    notes: list[str] | None = None,
    finetuned: Finetuned | None = None,
) -> dict[str, Any]:
    identity = job_identity(cfg, finetuned)
    digest = config_hash(identity)
    if outcomes is not None:  # per-image outcomes first, so a record never names a missing file
        metrics = {**metrics, "outcomes_file": save_outcomes(cfg.results_dir, digest, outcomes)}
    record = {
        "config_hash": digest,
        "method": cfg.method.name,
        "reducer": type(reducer).__name__,
        "hparams": reducer.hparams,
        "variant": variant_label(reducer),
        "model": cfg.model.name,
        "data_root": identity["data"]["root"],
        "num_images": len(data),
        "budget": budget,
        "config": identity,
        "metrics": metrics,
        "device": device_name(device),
        "git_commit": git_commit(),
        "timestamp": now_iso(),
        "seconds": seconds,
        "sweep_dir": _sweep_dir(),
        "notes": notes or [],
    }
    if finetuned is not None:
        record["finetune"] = finetuned.provenance
    append_record(cfg.results_dir, record)
    return record


def run_job(cfg: DictConfig) -> dict[str, Any] | None:
    """Run one job; returns its record, or None when ``resume`` skipped it.

    Every setting is validated and the results folder checked writable before anything is
    measured; records (the unreduced one included) are appended only once the job finished."""
    cfg, finetuned = resolve_finetuned(cfg)  # a bench.finetune checkpoint: its base model + trained state
    validate_settings(cfg)
    check_writable(cfg.results_dir)
    torch.manual_seed(cfg.seed)
    stats = cfg.get("stats") or {}
    check_options(stats.get("resample", "images"), stats.get("n_boot", 2000), stats.get("seed", 0))  # before any work
    device = resolve_device(cfg.device)
    digest = config_hash(job_identity(cfg, finetuned))
    if cfg.resume and digest in recorded_hashes(cfg.results_dir):
        say(f"[skip] {cfg.method.name}: already recorded ({digest}); resume=true", err=False)
        record_skip(f"{cfg.method.name}: already recorded ({digest})")
        return None
    method = cfg.method.name
    t_start = time.perf_counter()
    clock = PhaseClock()
    model = load_model(
        cfg.model.name, cfg.model.checkpoint, cfg.model.pretrained, random_init=cfg.model.get("random_init", False)
    )
    img_size = cfg.model.get("img_size")
    if img_size:
        set_resolution(model, int(img_size))
    validate_for_model(cfg, model)
    reducer = build_reducer_from_config(cfg.method)
    reducer, budget = solve_budget(reducer, cfg.budget.macs_ratio, cfg.budget.tolerance, model, method)
    try:
        apply_reducer(model, reducer)
    except ReducerConfigError as e:
        raise BenchError(f"method {method}: {e}") from None
    notes = reducer.notes()
    for note in notes:
        say(f"warning: method {method}: {note}")
    model.to(device)
    clock.add("setup", time.perf_counter() - t_start)
    with clock.phase("decode"):
        data = load_imagenet_folder(
            cfg.data.root, model, limit=cfg.data.limit, img_size=img_size, show_progress=cfg.progress
        )
    base = baseline(cfg, model, data, device)
    if finetuned is not None:
        swap_in(finetuned, cfg, model, data, device)
    hits_before = len(base.cache.hits) if base.cache else 0
    metrics, preds = measure(cfg, model, reducer, data, device, base, clock)
    metrics["seconds_by_phase"] = clock.record()
    if base.cache and base.cache.hits[hits_before:]:
        metrics["from_cache"] = sorted(set(base.cache.hits[hits_before:]))
    base_seconds = base.seconds if not base.recorded else 0.0
    if not base.recorded:
        base.metrics.update(unreduced_latency(metrics, method))
        if base.cache and base.cache.hits[:hits_before]:
            base.metrics["from_cache"] = sorted(set(base.cache.hits[:hits_before]))
        base_outcomes = outcomes_of(base.preds, data, None)
        unreduced = {"macs_ratio_target": None}
        _record(base.cfg, NoReduction(), unreduced, data, device, base.metrics, base.seconds, base_outcomes)
        base.recorded = True
    outcomes = outcomes_of(preds, data, base.preds)
    seconds = time.perf_counter() - t_start - base_seconds
    return _record(cfg, reducer, budget, data, device, metrics, seconds, outcomes, notes, finetuned)


def variant_label(reducer: TokenReducer) -> str:
    """The hyper-parameters that differ from the class defaults (the budget knob aside), so
    that two configurations of one method stay apart in tables and plots."""
    import inspect

    params = inspect.signature(type(reducer).__init__).parameters
    parts = []
    for key, value in reducer.hparams.items():
        default = params[key].default if key in params else inspect.Parameter.empty
        if key == reducer.budget_knob or (default is not inspect.Parameter.empty and _same(value, default)):
            continue
        if key.endswith("_path") and isinstance(value, str):
            value = Path(value).name
        parts.append(f"{key}={value}")
    return ", ".join(parts)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def model_without_reducer(model: nn.Module) -> nn.Module:
    """An unreduced copy that runs through the same patched code (``none`` reducer)."""
    ref = copy.deepcopy(model)
    remove_reducer(ref)
    apply_reducer(ref, NoReduction())
    return ref


def _sweep_dir() -> str | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return os.path.abspath(str(HydraConfig.get().sweep.dir))
    except (ValueError, ImportError):
        return None
