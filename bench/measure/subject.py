"""What every measurement of a job reads and where it writes: the patched model under test, its
images, the unreduced reference it is compared with, and the metrics measured so far.

Each measurement module (accuracy, flops, latency, spectral, scaling) has one job-side entry,
``<name>_job(section, subject, out)``, that takes its own typed ``bench.<name>`` section
(:mod:`bench.config`) and this; :func:`bench.job.measure` runs them in order.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import OmegaConf
from torch import nn

from bench.config import Config, DataConfig, ModelConfig

if TYPE_CHECKING:
    from bench.data import ImageSet
    from bench.measure.cache import MeasurementCache
    from bench.measure.predictions import Predictions
    from methods import TokenReducer


def canonical(section: Any) -> str:
    """A config section (typed or not) as sorted JSON, interpolations resolved: equal settings, equal text."""
    if dataclasses.is_dataclass(section):
        plain = dataclasses.asdict(section)
    else:
        plain = OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else section
    return json.dumps(plain, sort_keys=True, default=str)


@dataclass(frozen=True)
class ReferenceKey:
    """Which unreduced reference an in-process cache entry belongs to: the same weights
    (model section), the same images (data section), the same device."""

    model: str
    data: str
    device: str

    @classmethod
    def of(cls, model: ModelConfig, data: DataConfig, device: torch.device) -> ReferenceKey:
        return cls(canonical(model), canonical(data), str(device))


@dataclass
class Baseline:
    """The unreduced model measured on a job's images, shared by the jobs of one process."""

    preds: Predictions | None
    metrics: dict[str, Any]
    cfg: Config
    """The job config its record is written with (method ``none``, no budget)."""
    recorded: bool
    """Whether its record is in the store: it is appended only once a job using it has finished."""
    cache: MeasurementCache | None = None
    """The unreduced model's measurements on disk (predictions, spectral reference, scaling)."""
    seconds: float = 0.0


@dataclass(frozen=True)
class Subject:
    """One patched model under measurement."""

    model: nn.Module
    reducer: TokenReducer
    data: ImageSet
    device: torch.device
    name: str
    """The method's name, ``unreduced`` for the reference itself (progress bars, warnings)."""
    base: Baseline | None
    """The unreduced reference; None while the unreduced model itself is measured."""
    cache: MeasurementCache | None
    """The unreduced model's measurements on disk (its own, or the reference's for a reduced model)."""
    batch_size: int
    """Images per forward of the accuracy pass (``data.batch_size``)."""
    progress: bool
    amp: bool
    """bf16 autocast for every timed forward (``bench.latency.amp``)."""
    threads: int | None
    """CPU threads for every timed forward (``bench.latency.threads``)."""
    latency_compile: str
    """How the latency measurement runs both models (``bench.latency.compile``); cache keys of
    other timings carry it (:func:`bench.measure.cache.latency_key`)."""
    reference_key: ReferenceKey
    """Keys the unreduced reference kept in this process."""
    random_weights: bool = False
    """``model.random_init``: logits of random weights are nearly tied, so a compiled model's
    top-1 agreement with eager says little (its note says so)."""
    keep_block: int | None = None
    """The unreduced model's accuracy pass keeps the tokens entering this block (the reduced
    model's first reduction), so the reduced pass can start there (bench/measure/shared_prefix.py)."""

    @property
    def reduced(self) -> bool:
        return self.base is not None


def subject_of(
    cfg: Config,
    model: nn.Module,
    reducer: TokenReducer,
    data: ImageSet,
    device: torch.device,
    base: Baseline | None = None,
    cache: MeasurementCache | None = None,
    keep_block: int | None = None,
) -> Subject:
    """The subject of one job's measurements; a reduced model (``base`` given) reads the
    reference's measurement cache, the unreduced one its own ``cache``."""
    lat = cfg.bench.latency
    return Subject(
        model=model,
        reducer=reducer,
        data=data,
        device=device,
        name=cfg.method.name if base is not None else "unreduced",
        base=base,
        cache=base.cache if base is not None else cache,
        batch_size=cfg.data.batch_size,
        progress=cfg.progress,
        amp=lat.amp,
        threads=lat.threads,
        latency_compile=(lat.compile or "eager") if lat.enabled else "eager",  # what ran
        reference_key=ReferenceKey.of(cfg.model, cfg.data, device),
        random_weights=bool(cfg.model.random_init),
        keep_block=keep_block,
    )


@dataclass
class Measured:
    """What the measurements of one job found so far (later ones read earlier ones' metrics)."""

    metrics: dict[str, Any] = field(default_factory=dict)
    preds: Predictions | None = None
    """Top-5 predictions per image, from the accuracy measurement."""
