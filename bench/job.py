"""One benchmark job: one method, one budget, every enabled measurement, one record.

Jobs that run in the same process (Hydra's basic launcher) share the loaded weights, the
decoded images and the unreduced baseline, so a sweep spends its time in the models.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from bench.allocator import keep_freed_memory
from bench.budget import solve_budget
from bench.config import BenchConfig, Config, MethodConfig
from bench.data import ImageSet, load_imagenet_folder
from bench.errors import BenchError, record_skip
from bench.measure.accuracy import accuracy_job, accuracy_metrics, cached_predictions
from bench.measure.busy import mark_busy_batches, slower_than_usual, timing_settings
from bench.measure.cache import MeasurementCache, unreduced_cache
from bench.measure.flops import flops_job
from bench.measure.latency import latency_job, unreduced_latency
from bench.measure.outcomes import Outcomes, outcomes_of, save_outcomes
from bench.measure.packed_linear import packed_linear_kernels
from bench.measure.phases import PhaseClock
from bench.measure.predictions import Predictions
from bench.measure.scaling import scaling_job
from bench.measure.shared_prefix import start_block
from bench.measure.spectral import spectral_job
from bench.measure.subject import Baseline, Measured, ReferenceKey, Subject, canonical, subject_of
from bench.models import load_model, model_without_reducer, set_resolution
from bench.report.labels import variant_label
from bench.report.significance import check_options
from bench.results_io import check_writable
from bench.sources import resolve_sources
from bench.store import append_record, config_hash, device_name, git_commit, now_iso, read_records, recorded_hashes
from bench.terminal import say
from bench.train.finetuned import Finetuned, resolve_finetuned, swap_in
from bench.validate import check_memory, read_config, validate_for_model, validate_settings
from methods import ReducerConfigError, TokenReducer, apply_reducer
from methods.identity import NoReduction

_BASELINES: dict[tuple[ReferenceKey, str], Baseline] = {}
"""The unreduced reference per model, images, device and bench settings, for this process's jobs."""


def resolve_device(name: str) -> torch.device:
    """The ``device`` setting as a torch device (``auto``: CUDA where there is one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise BenchError(f"device={name} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):  # timing synchronises CUDA alone: another device's numbers would be wrong
        raise BenchError(f"device={name}: the harness measures on the CPU and CUDA only; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise BenchError(f"device={name} but this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}")
    return dev


def build_reducer_from_config(method_cfg: MethodConfig | DictConfig) -> TokenReducer:
    """The method's reducer, built from its ``reducer._target_`` and arguments (the typed
    section of a job, or a method YAML file as loaded)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    spec = getattr(method_cfg, "reducer", None)
    if spec is None or not hasattr(spec, "keys") or "_target_" not in spec:
        raise BenchError("method config needs a 'reducer' with a '_target_' class")
    try:
        reducer = instantiate(spec, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__ or e
        raise BenchError(f"cannot build method {getattr(method_cfg, 'name', None)!r}: {cause}") from None
    if not isinstance(reducer, TokenReducer):
        raise BenchError(f"{spec['_target_']} is not a TokenReducer subclass")
    return reducer


def job_identity(cfg: Config, finetuned: Finetuned | None = None) -> dict[str, Any]:
    """What determines a job's numbers: the key for resume and for 'latest per config'.

    The sections as plain dicts, exactly as the YAML files and overrides gave them (the schema's
    fields are the YAML keys, its numbers kept int or float as written), so every published
    record's ``config_hash`` is still the hash of its config (``tests/test_config_schema.py``)."""
    data = asdict(cfg.data)
    data["root"] = str(Path(data["root"]).expanduser().resolve())
    identity = {
        "method": asdict(cfg.method),
        "model": asdict(cfg.model),
        "data": data,
        "budget": asdict(cfg.budget),
        "bench": asdict(cfg.bench),
        "device": str(resolve_device(cfg.device)),
    }
    if finetuned is not None:  # fine-tuned weights: another model than the base they started from
        identity["finetuned"] = finetuned.identity
    return identity


@dataclass(frozen=True)
class Measurement:
    """One measurement of a job: its phase (also the name of its ``bench`` config section)
    and its entry, ``run(section, subject, out)``."""

    phase: str
    run: Callable[[Any, Subject, Measured], None]
    """Takes its typed section: ``bench.accuracy`` and ``bench.flops`` are a bool, the others
    a dataclass (:class:`~bench.config.LatencyConfig`, ...)."""
    reduced_only: bool = False
    """Relative to the unreduced model, which is its reference (latency: timed in alternation)."""

    def section(self, bench: BenchConfig) -> Any:
        return getattr(bench, self.phase)

    def switched_on(self, bench: BenchConfig) -> bool:
        section = self.section(bench)
        return bool(section) if isinstance(section, bool) else bool(section.enabled)


MEASUREMENTS = [
    Measurement("accuracy", accuracy_job),
    Measurement("flops", flops_job),
    Measurement("latency", latency_job, reduced_only=True),
    Measurement("spectral", spectral_job, reduced_only=True),
    Measurement("scaling", scaling_job, reduced_only=True),
]
"""In the order a job runs them: later ones read earlier ones' metrics (speedup efficiency
needs the MACs ratio)."""


def measure(
    cfg: Config,
    model: nn.Module,
    reducer: TokenReducer,
    data: ImageSet,
    device: torch.device,
    base: Baseline | None,
    clock: PhaseClock | None = None,
    cache: MeasurementCache | None = None,
    keep_block: int | None = None,
) -> tuple[dict[str, Any], Predictions | None]:
    """Every enabled measurement of one patched model; relative numbers against ``base``.

    The unreduced model (``base`` None) takes its predictions and FLOPs from ``cache`` when it
    can and is not timed here: its latency is the one measured in alternation with the first reduced
    job (see :func:`run_job`). Each phase's seconds accumulate in ``clock``."""
    clock = clock or PhaseClock()
    subject = subject_of(cfg, model, reducer, data, device, base, cache, keep_block)
    out = Measured()
    for m in MEASUREMENTS:
        if m.switched_on(cfg.bench) and (subject.reduced or not m.reduced_only):
            with clock.phase(m.phase):
                m.run(m.section(cfg.bench), subject, out)
    return out.metrics, out.preds


def baseline(cfg: Config, model: nn.Module, data: ImageSet, device: torch.device) -> Baseline:
    """The unreduced model on the same images: measured once per process, and recorded by the
    first job that finishes with it (see :func:`run_job`), so a failing job records nothing.
    Its predictions come from the measurement cache when they were measured before (any
    sweep, same weights, images, device and settings). With ``resume=true`` a stored
    unreduced record is reused, not measured or appended again; its predictions come from the
    cache or are recomputed (agreement needs them, records do not hold them)."""
    key = (ReferenceKey.of(cfg.model, cfg.data, device), canonical(cfg.bench))
    if key not in _BASELINES:
        base_cfg = replace(
            cfg,
            method=MethodConfig("none", {"_target_": "methods.identity.NoReduction"}),
            budget=replace(cfg.budget, macs_ratio=None),
        )
        t0 = time.perf_counter()
        plain = model_without_reducer(model)
        cache = unreduced_cache(cfg.results_dir, plain, cfg.model, data, device, enabled=cfg.cache)
        stored = _stored_baseline(cfg, base_cfg)
        keep = start_block(model)  # this job's first reduction: its accuracy pass may start there
        preds = None
        if stored is not None and cfg.bench.accuracy:
            preds = cached_predictions(cache, plain, data.images, cfg.data.batch_size, device, cfg.progress, keep)
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
            metrics, preds = measure(cfg, plain, NoReduction(), data, device, None, own, cache, keep)
            metrics["seconds_by_phase"] = own.record()
            _BASELINES[key] = Baseline(preds, metrics, base_cfg, recorded=False, cache=cache)
        _BASELINES[key].seconds = time.perf_counter() - t0
    return _BASELINES[key]


def _flag_slow_machine(
    cfg: Config, metrics: dict[str, Any], device: torch.device, finetuned: Finetuned | None, method: str
) -> None:
    """Mark the latency busy where the unreduced model ran much slower than the run store's
    earlier records at the same settings usually did (:func:`bench.measure.busy.slower_than_usual`): a
    contended host that neither the load average nor the timings' spread shows."""
    if "latency_batches" not in metrics:
        return
    this = {"model": cfg.model.name, "device": device_name(device), "config": job_identity(cfg, finetuned)}
    reasons = slower_than_usual(metrics, timing_settings(this), read_records(cfg.results_dir))
    mark_busy_batches(metrics, reasons)
    if reasons:
        why = "; ".join(f"batch {n}: {r}" for n, r in reasons.items())
        say(f"warning: {method}: latency measured on a slower machine than usual ({why})")


def _stored_baseline(cfg: Config, base_cfg: Config) -> dict[str, Any] | None:
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
    cfg: Config,
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
        "allocator": keep_freed_memory(),
        "linear_kernels": packed_linear_kernels(device),
        "torch": torch.__version__,
        "git_commit": git_commit(),
        "timestamp": now_iso(),
        "seconds": seconds,
        "sweep_dir": _sweep_dir(),
        "notes": notes or [],
    }
    if finetuned is not None:
        record["finetune"] = finetuned.provenance
    try:
        append_record(cfg.results_dir, record)
    except BenchError:  # not recorded (a full disk): an outcomes file that no record names must not stay
        if outcomes is not None:
            (Path(cfg.results_dir) / metrics["outcomes_file"]).unlink(missing_ok=True)
        raise
    return record


def reduce_model(cfg: Config, model: nn.Module, overrides: list[str] | None = None) -> tuple[TokenReducer, dict]:
    """Build the configured reducer, solve its budget on ``model`` and patch it in; returns the
    reducer and the budget's record fields. Shapes are all it reads, so the sweep runs it on the
    weightless model before its only job, to refuse what the job would (:mod:`bench.callbacks`).
    ``overrides``: the command line's, for :func:`bench.budget.refuse_overridden_knob` (default:
    this job's)."""
    method = cfg.method.name
    reducer = build_reducer_from_config(cfg.method)
    reducer, budget = solve_budget(reducer, cfg.budget.macs_ratio, cfg.budget.tolerance, model, method, overrides)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            apply_reducer(model, reducer)
    except ReducerConfigError as e:
        raise BenchError(f"method {method}: {e}") from None
    noted = set(reducer.notes())  # the job prints and records these: not twice
    for w in caught:
        if str(w.message) not in noted:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return reducer, budget


def run_job(cfg: Config | DictConfig) -> dict[str, Any] | None:
    """Run one job; returns its record, or None when ``resume`` skipped it.

    The config is read once, here: typed (:func:`bench.validate.read_config`) and every setting
    validated, and the results folder checked writable, before anything is measured; from then
    on each part gets its own section. Records (the unreduced one included) are appended only
    once the job finished."""
    keep_freed_memory()  # before the first large tensor: CPU forwards stop paying page faults (bench/allocator.py)
    cfg = read_config(cfg)
    validate_settings(cfg)
    check_writable(cfg.results_dir)
    check_options(cfg.stats.resample, cfg.stats.n_boot, cfg.stats.seed)  # before any work
    device = resolve_device(cfg.device)
    cfg = resolve_sources(cfg)  # which weights and images (a fresh clone has no local ones), said up front
    cfg, finetuned = resolve_finetuned(cfg)  # a bench.finetune checkpoint: its base model + trained state
    torch.manual_seed(cfg.seed)
    digest = config_hash(job_identity(cfg, finetuned))
    redo_busy = cfg.resume == "busy"
    if cfg.resume and digest in recorded_hashes(cfg.results_dir, redo_busy=redo_busy):
        said = f"already recorded ({digest}){', not busy' if redo_busy else ''}"
        say(f"[skip] {cfg.method.name}: {said}; resume={str(cfg.resume).lower()}", err=False)
        record_skip(f"{cfg.method.name}: {said}")
        return None
    method = cfg.method.name
    t_start = time.perf_counter()
    clock = PhaseClock()
    model = load_model(cfg.model.name, cfg.model.checkpoint, cfg.model.pretrained, random_init=cfg.model.random_init)
    img_size = cfg.model.img_size
    if img_size:
        set_resolution(model, int(img_size))
    validate_for_model(cfg, model)
    reducer, budget = reduce_model(cfg, model)
    notes = reducer.notes()
    for note in notes:
        say(f"warning: method {method}: {note}")
    model.to(device)
    clock.add("setup", time.perf_counter() - t_start)
    with clock.phase("decode"):
        data = load_imagenet_folder(
            cfg.data.root, model, limit=cfg.data.limit, img_size=img_size, show_progress=cfg.progress
        )
    check_memory(cfg, model, len(data), device)  # a batch that cannot fit: refused before the first forward
    base = baseline(cfg, model, data, device)
    if finetuned is not None:
        swap_in(finetuned, cfg, model, data, device)
    hits_before = len(base.cache.hits) if base.cache else 0
    metrics, preds = measure(cfg, model, reducer, data, device, base, clock)
    metrics["seconds_by_phase"] = clock.record()
    _flag_slow_machine(cfg, metrics, device, finetuned, method)
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


def _sweep_dir() -> str | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return os.path.abspath(str(HydraConfig.get().sweep.dir))
    except (ValueError, ImportError):
        return None
