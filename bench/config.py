"""The typed configuration of a ``bench.run`` job: one dataclass per section of
``bench/conf/config.yaml``, registered in Hydra's ConfigStore as ``base_config``.

Why: a job used to hand the whole DictConfig tree to some twenty functions, each picking its
own keys out of it, so a mistyped value surfaced wherever it was first read, and what a
measurement depended on could only be learnt by reading its code. Now the YAML files name
this schema (``defaults: [base_config, ...]``), Hydra checks every value's type when it
composes the config, :func:`bench.validate.read_config` turns the composed tree into a
:class:`Config` once, at the door of :func:`bench.job.run_job`, and each measurement gets its
own section (:class:`LatencyConfig`, :class:`SpectralConfig`, ...).

The YAML files keep the values users read and override; the defaults here are the same values
(``tests/test_config_schema.py`` holds them equal), so a section can be built in code too
(the method has none: each method's YAML file is its own).

The job identity (:func:`bench.job.job_identity`) hashes the ``method``, ``model``, ``data``,
``budget`` and ``bench`` sections as JSON, so the fields below are exactly the keys of the YAML
files, and numbers that users write either way are :data:`Number` (``int`` or ``float``, kept
as given): a ``float`` field would turn ``max_seconds: 10`` into ``10.0`` and change the
hash of every published record.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

Number = int | float
"""A number kept as written: ``10`` stays an int and ``0.5`` a float (see the module docstring)."""


@dataclass
class ModelConfig:
    """Which timm ViT and which weights (``bench/conf/model/``; resolved by :mod:`bench.sources`)."""

    name: str = "deit_tiny_patch16_224"
    checkpoint: str | None = None
    pretrained: bool = False
    random_init: bool = False
    img_size: int | None = None


@dataclass
class DataConfig:
    """The evaluation images (``bench/conf/data/``)."""

    root: str | None = None
    limit: int | None = None
    batch_size: int = 100


@dataclass
class LatencyConfig:
    """``bench.latency`` (:mod:`bench.measure.latency`)."""

    enabled: bool = True
    batch_size: Any = "auto"
    """``auto``, one integer or a list of them: checked by :func:`bench.measure.latency.latency_batch_sizes`."""
    compile: str | None = "eager"
    warmup: int = 1
    iters: int = 5
    tolerance: Number | None = 0.05
    max_seconds: Number | None = 10
    max_iters: int = 100
    amp: bool = False
    threads: int | None = None


@dataclass
class SpectralConfig:
    """``bench.spectral`` (:mod:`bench.measure.spectral`)."""

    enabled: bool = True
    images: int = 64
    bands: int = 6
    iou_keep: Number = 0.5


@dataclass
class ScalingConfig:
    """``bench.scaling`` (:mod:`bench.measure.scaling`)."""

    enabled: bool = True
    resolutions: list[int] = field(default_factory=lambda: [224, 384, 512, 768, 1024, 1536, 2048, 3072, 4096])
    batch_tokens: int = 6304
    warmup: int = 1
    iters: int = 5
    max_seconds_per_point: Number | None = 1.5
    claim_resolution: int = 4096


@dataclass
class BenchConfig:
    """What each job measures (``bench/conf/bench/``)."""

    accuracy: bool = True
    flops: bool = True
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    spectral: SpectralConfig = field(default_factory=SpectralConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)


@dataclass
class BudgetConfig:
    """The MACs budget every method's knob is solved for (:mod:`bench.budget`)."""

    macs_ratio: Number | None = 0.65
    tolerance: Number = 0.02


@dataclass
class StatsConfig:
    """Leaderboard statistics (:mod:`bench.report.stats`); not part of a job's identity."""

    resample: str = "images"
    n_boot: int = 2000
    seed: int = 0


@dataclass
class MethodConfig:
    """One method (``bench/conf/method/``): only its name is typed; ``reducer`` is built by its
    ``_target_`` and each method has arguments of its own. No defaults: the method's YAML file
    gives both."""

    name: str = MISSING
    reducer: Any = MISSING


@dataclass
class Config:
    """A whole ``bench.run`` job (``bench/conf/config.yaml`` without Hydra's own ``hydra`` node)."""

    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    resume: Any = False
    """false, true (skip configs already recorded) or ``busy`` (skip them unless their latest
    record's latency was measured on a busy machine): typed in :mod:`bench.validate`."""
    results_dir: str = "results/local"
    device: str = "auto"
    seed: int = 0
    progress: bool = True
    cache: bool = True
    stats: StatsConfig = field(default_factory=StatsConfig)


@dataclass
class VisualizeAppConfig(Config):
    """``bench.visualize``: a job's config plus what to draw (checked by :func:`bench.visualize.read_settings`)."""

    visualize: Any = None


def _visualize_schema() -> DictConfig:
    """:class:`VisualizeAppConfig` with the sections it inherits left missing.

    ``visualize.yaml`` merges it after ``config`` (a schema can only be merged into its own
    class or a base class of it): it adds the ``visualize`` section to the typed tree, and
    missing values leave what ``config.yaml`` and the groups set as it was."""
    node = OmegaConf.structured(VisualizeAppConfig)
    for f in fields(Config):
        node[f.name] = MISSING
    return node


def register_configs() -> None:
    """Put the schemas where the YAML files' defaults lists find them."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(name="base_visualize", node=_visualize_schema())


register_configs()


def typed(cfg: DictConfig | dict[str, Any]) -> Config:
    """``cfg`` (a composed tree, or a plain one such as ``bench.finetune`` builds) as a
    :class:`Config`; keys it lacks take the schema's defaults, Hydra's ``hydra`` node is left
    out. Raises OmegaConf's ``ValidationError`` for a value of the wrong type (see
    :func:`bench.validate.read_config` for the one-line message)."""
    tree = OmegaConf.create(cfg) if not OmegaConf.is_config(cfg) else cfg
    if "hydra" in tree:
        tree = OmegaConf.masked_copy(tree, [k for k in tree if k != "hydra"])
    merged = OmegaConf.merge(OmegaConf.structured(Config), tree)
    return OmegaConf.to_object(merged)
