"""Every numeric setting checked before a job measures or records anything.

A value out of range (a batch of 0, a negative warm-up, ``budget.macs_ratio=abc``) would
otherwise crash half-way through a job, after the unreduced model was measured with it, or
worse, produce a number. One line names the setting, what it must be and what it got.
A batch that cannot fit in memory is refused the same way (:func:`check_memory`), once the
model and images are known but before the first forward.

The types themselves are the schema's (:mod:`bench.config`): Hydra refuses ``abc`` for an
integer when it composes the config, and :func:`config_error` gives that refusal the same
line as the check below would (:data:`SETTINGS`), so a setting says the same whichever layer
caught it. :func:`read_config` is where a job's config becomes typed, once.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError
from torch import nn

from bench.config import Config, typed
from bench.errors import BenchError
from bench.measure.flops import VitShape
from bench.measure.latency import check_latency_settings, configured_device_type, latency_batch_sizes
from bench.sources import check_random_weights

_MISSING = object()

Check = Callable[[str, Any], "str | None"]
"""What a setting must be: the one-line message for ``(key, value)``, or None when it is fine."""


def _get(cfg: Config | Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if isinstance(node, Mapping):  # a composed DictConfig section, or a plain dict
            if part not in node:
                return _MISSING
            node = node[part]
        elif hasattr(node, part):  # a typed Config
            node = getattr(node, part)
        else:
            return _MISSING
    return node


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(minimum: int, nullable: bool = False) -> Check:
    """An integer of at least ``minimum`` (or null)."""

    def check(key: str, v: Any) -> str | None:
        if (v is None and nullable) or (_is_int(v) and v >= minimum):
            return None
        also = " or null" if nullable else ""
        return f"{key} must be an integer >= {minimum}{also}, got {v!r}"

    return check


def number(lo: float, hi: float, lo_open: bool, nullable: bool = False, hi_open: bool = False) -> Check:
    """A finite number in ``(lo, hi]`` (``[lo, ...`` unless ``lo_open``, ``..., hi)`` if
    ``hi_open``), or null."""

    def check(key: str, v: Any) -> str | None:
        inside = _is_number(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if (v is None and nullable) or inside:
            return None
        also = " or null" if nullable else ""
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        return f"{key} must be a number in {interval}{also}, got {v!r}"

    return check


def flag(key: str, v: Any) -> str | None:
    return None if isinstance(v, bool) else f"{key} must be true or false, got {v!r}"


def resume_mode(key: str, v: Any) -> str | None:
    if isinstance(v, bool) or v == "busy":
        return None
    return f"{key} must be true, false or busy (redo the jobs whose latest record is busy), got {v!r}"


def resolutions(key: str, v: Any) -> str | None:
    if not isinstance(v, list) or not v or not all(_is_int(s) and s > 0 for s in v):
        return f"{key} must be a non-empty list of positive integers, got {v!r}"
    if v != sorted(set(v)):
        return f"{key} must be strictly increasing, got {v}"
    return None


BEFORE_SOURCES: dict[str, Check] = {
    "budget.macs_ratio": number(0.0, 1.0, lo_open=True, nullable=True),
    "budget.tolerance": number(0.0, 0.5, lo_open=True),
    "data.batch_size": integer(1),
    "data.limit": integer(1, nullable=True),
    "seed": integer(0),
    "resume": resume_mode,
    **dict.fromkeys(("progress", "cache", "bench.accuracy", "bench.flops", "bench.latency.amp"), flag),
    **dict.fromkeys(("bench.latency.enabled", "bench.spectral.enabled", "bench.scaling.enabled"), flag),
}
"""The settings checked first, in this order, before the weights and the latency modes."""

MEASUREMENT_SETTINGS: dict[str, Check] = {
    "bench.latency.iters": integer(1),
    "bench.latency.warmup": integer(0),
    "bench.latency.threads": integer(1, nullable=True),
    "bench.latency.tolerance": number(0.0, 1.0, lo_open=True, nullable=True),
    "bench.latency.max_seconds": number(0.0, math.inf, lo_open=True, nullable=True),
    "bench.latency.max_iters": integer(1),
    "bench.scaling.max_seconds_per_point": number(0.0, math.inf, lo_open=True, nullable=True),
    "bench.spectral.images": integer(1),
    "bench.spectral.bands": integer(1),
    "bench.scaling.batch_tokens": integer(1),
    "bench.scaling.iters": integer(1),
    "bench.scaling.warmup": integer(0),
    "bench.scaling.claim_resolution": integer(1),
    "model.img_size": integer(1, nullable=True),
    "bench.scaling.resolutions": resolutions,
}
"""Checked after them, in this order."""

SETTINGS = {**BEFORE_SOURCES, **MEASUREMENT_SETTINGS}
"""Every checked setting: also what a value of the wrong type is told (:func:`config_error`)."""
SETTINGS_SECTIONS = {key.split(".")[0] for key in SETTINGS} | {"device", "model", "bench"}
"""The top-level sections :func:`validate_settings` reads (its checks' keys, the device, the
model and bench sections of the random-weights and latency checks)."""

POSITIVE = number(0.0, math.inf, lo_open=True)
NON_NEGATIVE = number(0.0, math.inf, lo_open=False)
FINETUNE_SETTINGS: dict[str, Check] = {
    "finetune.images": integer(1, nullable=True),
    "finetune.epochs": number(0.0, math.inf, lo_open=True, nullable=True),
    "finetune.batch_size": integer(1),
    "finetune.micro_batch": integer(1),
    "finetune.lr": POSITIVE,
    "finetune.weight_decay": NON_NEGATIVE,
    "finetune.min_lr": NON_NEGATIVE,
    "finetune.warmup_epochs": NON_NEGATIVE,
    "finetune.drop_path": number(0.0, 1.0, lo_open=False, hi_open=True),
    "finetune.ema_decay": number(0.0, 1.0, lo_open=True, nullable=True, hi_open=True),
    "finetune.eval_ema": flag,
    "finetune.kd_weight": number(0.0, 1.0, lo_open=False),
    "finetune.temperature": POSITIVE,
    "finetune.label_smoothing": number(0.0, 1.0, lo_open=False, hi_open=True),
    "finetune.clip_grad": number(0.0, math.inf, lo_open=True, nullable=True),
    "finetune.amp": flag,
    "finetune.augment": flag,
    "finetune.re_prob": number(0.0, 1.0, lo_open=False),
    "finetune.checkpoint_every": integer(1),
    "finetune.num_workers": integer(0),
}
"""Every value of the ``finetune`` recipe the job reads. The group has no typed schema (a recipe
file may add keys of its own), so without these a wrong value reached the arithmetic that
builds the recipe: ``finetune.lr=abc`` ended in a traceback, ``finetune.batch_size=0`` in a
division by zero."""


BUDGET_SETTINGS = {k: v for k, v in BEFORE_SOURCES.items() if k.startswith("budget.")}


def check_budget(cfg: Config | Mapping[str, Any]) -> None:
    """The ``budget`` section's values (``bench.visualize`` solves every method's budget from it:
    checked once, before any method is drawn)."""
    _check(cfg, BUDGET_SETTINGS)


FINETUNE_RUN_SETTINGS: dict[str, Check] = {
    "data.train_limit": integer(1, nullable=True),
    "resume": flag,
}
"""``bench.finetune``'s own settings outside the recipe (its ``resume`` continues a training run:
true or false, not ``bench.run``'s ``busy``)."""


def check_finetune_run(cfg: Mapping[str, Any]) -> None:
    """Raise :class:`BenchError` for the first of :data:`FINETUNE_RUN_SETTINGS` the run cannot use."""
    _check(cfg, FINETUNE_RUN_SETTINGS)


def check_finetune_settings(recipe: Mapping[str, Any]) -> None:
    """Raise :class:`BenchError` for the first value of the ``finetune`` section ``recipe`` the
    job cannot use, before anything loads; keys a recipe file adds of its own pass untouched."""
    _check({"finetune": recipe}, FINETUNE_SETTINGS)
    if recipe.get("images") is None and recipe.get("epochs") is None:
        raise BenchError("finetune.epochs and finetune.images are both null: set one of them")


def _check(cfg: Config | Mapping[str, Any], checks: dict[str, Check]) -> None:
    for key, check in checks.items():
        v = _get(cfg, key)
        problem = None if v is _MISSING else check(key, v)
        if problem:
            raise BenchError(problem)


def validate_settings(cfg: Config) -> None:
    """Raise :class:`BenchError` for the first setting that cannot give an honest measurement."""
    _check(cfg, BEFORE_SOURCES)
    check_random_weights(cfg.model, cfg.bench)  # random weights: FLOPs, latency and scaling only
    check_latency_settings(cfg.bench.latency, cfg.device)  # batch size(s) and compile mode (cudagraphs: CUDA only)
    _check(cfg, MEASUREMENT_SETTINGS)


def config_error(error: BaseException) -> BenchError | None:
    """One line for a setting whose value does not fit its type in the schema (Hydra's
    composition, or :func:`read_config`, failed on it): the setting's own check message
    where it has one (``bench.latency.iters must be an integer >= 1, got 'abc'``), else the
    key and OmegaConf's reason. An option a config group does not have (``model=deit_huge``,
    ``method=tomx``) gets one line naming the options, where Hydra would print them one per
    line with its search path. None for any other error (a bad override's syntax), which
    Hydra reports itself."""
    missing = unknown_group_option(error)
    if missing is not None:
        return missing
    unknown = (ConfigKeyError, ConfigAttributeError)
    cause = error if isinstance(error, (ValidationError, *unknown)) else error.__cause__
    if isinstance(cause, unknown) and cause.full_key:
        return unknown_setting(str(cause.full_key))
    if not isinstance(cause, ValidationError) or not cause.full_key:
        return None
    key = re.sub(r"(\[\d+\])+$", "", str(cause.full_key))  # an element of a list: the list's setting
    if schema_section(key) is not None:  # budget=0.5: a value given to a section of settings
        return section_given_a_value(key)
    check = SETTINGS.get(key)
    message = check(key, cause.value) if check is not None else None
    return BenchError(message or f"{key}: {str(cause.msg).splitlines()[0]}")


def unknown_group_option(error: BaseException) -> BenchError | None:
    """``model=deit_huge``: Hydra's :class:`~hydra.errors.MissingConfigException` names the
    missing ``group/option`` and, for a group it knows, the options it has."""
    from hydra.errors import MissingConfigException

    if not isinstance(error, MissingConfigException) or not error.missing_cfg_file or not error.options:
        return None
    group, _, option = str(error.missing_cfg_file).rpartition("/")
    if not group:
        return None
    return BenchError(f"{group}={option}: no such {group}; choose one of {', '.join(sorted(error.options))}")


def _section(schema: Any, name: str) -> Any:
    """The dataclass of ``schema``'s sub-section ``name``; None for a plain value, an open
    section (a method's ``reducer``) or a name the schema lacks."""
    if not dataclasses.is_dataclass(schema):
        return None
    found = {f.name: f for f in dataclasses.fields(schema)}.get(name)
    factory = found.default_factory if found is not None else None
    return factory if callable(factory) and dataclasses.is_dataclass(factory) else None


def schema_section(key: str) -> Any:
    """The dataclass of the schema's section at the dotted ``key`` (``bench.latency``); None where
    ``key`` is a plain setting, an open section or not in the schema."""
    section: Any = Config
    for part in key.split("."):
        section = _section(section, part)
    return section if dataclasses.is_dataclass(section) else None


def section_given_a_value(key: str) -> BenchError:
    """One line for ``budget=0.5``: ``key`` is a section of the schema, not a setting; the
    message names the settings it has."""
    names = ", ".join(f"{key}.{f.name}" for f in dataclasses.fields(schema_section(key)))
    return BenchError(f"{key} is a section of settings, not a value; set one of {names}")


def unknown_setting(key: str) -> BenchError:
    """One line for a key the schema does not have (a misspelt setting), naming the settings
    its section does have, so the fix is in the message."""
    parent, _, _ = key.rpartition(".")
    section = schema_section(parent) if parent else Config
    if not dataclasses.is_dataclass(section):
        return BenchError(f"{key} is not a setting")
    names = ", ".join(f.name for f in dataclasses.fields(section))
    return BenchError(f"{key} is not a setting; {parent or 'the top level'} has: {names}")


def first_misfit_key(tree: Any, schema: Any, prefix: str = "") -> str | None:
    """The first key of ``tree`` (a config section, nested) that the ``schema`` dataclass lacks,
    or that holds a value where the schema has a section (``budget=0.5``: merging it into the
    schema would fail without naming the key); sections typed ``Any`` (a method's ``reducer``)
    and Hydra's own node are open. :func:`schema_section` tells the two apart."""
    if not dataclasses.is_dataclass(schema) or not hasattr(tree, "keys"):
        return None
    names = {f.name for f in dataclasses.fields(schema)}
    for key in tree.keys():
        if not prefix and key == "hydra":
            continue
        section = _section(schema, key)
        if key not in names or (section is not None and not hasattr(tree[key], "keys")):
            return f"{prefix}{key}"
        found = first_misfit_key(tree[key], section, f"{prefix}{key}.")
        if found is not None:
            return found
    return None


def read_config(cfg: Config | DictConfig | dict[str, Any]) -> Config:
    """The job's typed config, read once at the door of :func:`bench.job.run_job`: a composed
    tree or a plain one (``bench.finetune``'s evaluation config) as a :class:`Config`, a value
    of the wrong type refused in one line."""
    if isinstance(cfg, Config):
        return cfg
    misfit = first_misfit_key(cfg, Config)
    if misfit is not None:  # ``+bench.latency.foo=1`` gets past Hydra's schema; typing would drop it
        raise section_given_a_value(misfit) if schema_section(misfit) is not None else unknown_setting(misfit)
    try:
        return typed(cfg)
    except OmegaConfBaseException as e:
        error = config_error(e)
        if error is None:
            raise BenchError(f"{e.full_key or 'config'}: {str(e.msg).splitlines()[0]}") from None
        raise error from None


def validate_for_model(cfg: Config, model: nn.Module) -> None:
    """Settings that depend on the model: every scaling resolution must be a whole number of patches."""
    sc = cfg.bench.scaling
    if not sc.enabled:
        return
    patch = model.patch_embed.patch_size[0]
    bad = [s for s in sc.resolutions if s % patch]
    if bad:
        raise BenchError(
            f"bench.scaling.resolutions {bad} are not divisible by the patch size {patch} of {cfg.model.name}"
        )


# -- memory: a batch that cannot fit is refused before the first forward ------------------------

GIB = 2**30
_FLOAT32 = 4


@dataclass(frozen=True)
class MemoryNeed:
    """What one forward of a setting's batch needs on top of what is resident (weights, images)."""

    setting: str
    """The setting as the user writes it, with what it implies (``bench.latency.batch_size=32``)."""
    input_bytes: int
    activation_bytes: int
    size: int
    """Image side in pixels."""

    @property
    def total(self) -> int:
        return self.input_bytes + self.activation_bytes


def forward_bytes(shape: VitShape, batch: int, size: int) -> tuple[int, int]:
    """Input and peak activation bytes of one no-grad fp32 forward of ``batch`` images at ``size`` px.

    The peak is tokens × (4 × width + 2 × MLP width) floats per image: the residual stream, the
    normed copy and the attention output, then the MLP's hidden layer before and after GELU. The
    torch profiler's peak on DeiT-Tiny is exactly this (batch 8 and 32). Fused attention keeps the
    tokens × tokens scores out of it; reducers that read attention maps need more, so this is a
    lower bound, and a setting refused on it cannot fit."""
    grid = size // math.isqrt(shape.patch)
    tokens = grid * grid + shape.num_prefix
    inputs = batch * shape.in_chans * size * size * _FLOAT32
    activations = batch * tokens * (4 * shape.dim + 2 * shape.mlp_hidden) * _FLOAT32
    return inputs, activations


def memory_needs(
    cfg: Config, shape: VitShape, size: int, n_images: int, device: torch.device | None = None
) -> list[MemoryNeed]:
    """The largest forward each enabled measurement will run: the accuracy pass's batch (at most
    the images there are), the largest latency batch (repeated images, whatever their number;
    ``device`` decides ``auto``'s, None: the configured device), and the scaling points that
    will certainly be timed (every resolution without a time budget, else the first)."""
    needs = []
    bench = cfg.bench
    if bench.accuracy:
        batch = min(int(cfg.data.batch_size), n_images)
        needs.append(MemoryNeed(f"data.batch_size={cfg.data.batch_size}", *forward_bytes(shape, batch, size), size))
    if bench.latency.enabled:
        device_type = device.type if device is not None else configured_device_type(cfg.device)
        needs.append(_latency_need(bench.latency.batch_size, shape, size, device_type))
    sc = bench.scaling
    if sc.enabled:
        sizes = list(sc.resolutions) if sc.max_seconds_per_point is None else list(sc.resolutions)[:1]
        needs += [need for s in sizes for need in _scaling_needs(shape, int(s), int(sc.batch_tokens))]
    return needs


def _latency_need(value: Any, shape: VitShape, size: int, device_type: str) -> MemoryNeed:
    """The largest batch of ``bench.latency.batch_size`` (a list, one integer or auto)."""
    batch = max(latency_batch_sizes(value, device_type))
    written = value if isinstance(value, int) else "auto" if value is None else f"{value}".replace(" ", "")
    setting = f"bench.latency.batch_size={written}" + ("" if isinstance(value, int) else f" (batch {batch})")
    return MemoryNeed(setting, *forward_bytes(shape, batch, size), size)


def _scaling_needs(shape: VitShape, size: int, batch_tokens: int) -> list[MemoryNeed]:
    """One scaling point: batch 1, and the batch that holds ``batch_tokens`` tokens."""
    grid = size // math.isqrt(shape.patch)
    batch = max(1, batch_tokens // (grid * grid + shape.num_prefix))
    return [
        MemoryNeed(f"bench.scaling.resolutions ({size} px, batch 1)", *forward_bytes(shape, 1, size), size),
        MemoryNeed(
            f"bench.scaling.batch_tokens={batch_tokens} ({batch} images at {size} px)",
            *forward_bytes(shape, batch, size),
            size,
        ),
    ]


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can get on ``device``; None where it cannot be told.

    CUDA: the driver's free memory plus what torch's caching allocator holds unused. CPU: the
    kernel's MemAvailable, capped by the cgroup limit a container or SLURM job runs under."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    known = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    return min(known) if known else None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # not Linux: free physical pages
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_available() -> int | None:
    """cgroup v2 limit minus the memory charged to it that is not page cache (page cache is
    given back under pressure, so counting it would refuse batches that fit)."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        current = int((root / "memory.current").read_text())
        stat = dict(line.split() for line in (root / "memory.stat").read_text().splitlines())
        return int(limit) - (current - int(stat.get("file", 0)))
    except (OSError, ValueError):
        return None


def check_memory(cfg: Config, model: nn.Module, n_images: int, device: torch.device) -> None:
    """Refuse, before the first forward, a batch whose forward cannot fit in the memory available
    now (weights and decoded images are already resident). Without this a latency batch of
    100000 ran the whole accuracy pass first and then died allocating 60 GB, reported as a bug."""
    available = available_memory(device)
    if available is None:
        return
    size = int(model.patch_embed.img_size[0])
    name = cfg.model.name
    for need in memory_needs(cfg, VitShape.of(model), size, n_images, device):
        if need.total > available:
            raise BenchError(
                f"{need.setting} needs about {_gib(need.total)} on {device} (input {_gib(need.input_bytes)} + "
                f"activations {_gib(need.activation_bytes)} for {name} at {need.size} px), but "
                f"{_gib(available)} is available; lower it"
            )


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 2**20:.0f} MiB"
