"""Every numeric setting checked before a job measures or records anything.

A value out of range (a batch of 0, a negative warm-up, ``budget.macs_ratio=abc``) would
otherwise crash half-way through a job, after the unreduced model was measured with it, or
worse, produce a number. One line names the setting, what it must be and what it got.
"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, ListConfig
from torch import nn

from bench.errors import BenchError

_MISSING = object()


def _get(cfg: DictConfig, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(cfg: DictConfig, key: str, minimum: int, nullable: bool = False) -> None:
    v = _get(cfg, key)
    if v is _MISSING or (v is None and nullable):
        return
    if not _is_int(v) or v < minimum:
        also = " or null" if nullable else ""
        raise BenchError(f"{key} must be an integer >= {minimum}{also}, got {v!r}")


def _number(cfg: DictConfig, key: str, lo: float, hi: float, lo_open: bool, nullable: bool = False) -> None:
    v = _get(cfg, key)
    if v is _MISSING or (v is None and nullable):
        return
    inside = _is_number(v) and (v > lo if lo_open else v >= lo) and v <= hi
    if not inside:
        bracket = "(" if lo_open else "["
        also = " or null" if nullable else ""
        raise BenchError(f"{key} must be a number in {bracket}{lo:g}, {hi:g}]{also}, got {v!r}")


def _flag(cfg: DictConfig, key: str) -> None:
    v = _get(cfg, key)
    if v is not _MISSING and not isinstance(v, bool):
        raise BenchError(f"{key} must be true or false, got {v!r}")


def validate_settings(cfg: DictConfig) -> None:
    """Raise :class:`BenchError` for the first setting that cannot give an honest measurement."""
    _number(cfg, "budget.macs_ratio", 0.0, 1.0, lo_open=True, nullable=True)
    _number(cfg, "budget.tolerance", 0.0, 0.5, lo_open=True)
    _integer(cfg, "data.batch_size", 1)
    _integer(cfg, "data.limit", 1, nullable=True)
    _integer(cfg, "seed", 0)
    for key in ("resume", "progress", "cache", "bench.accuracy", "bench.flops", "bench.latency.amp"):
        _flag(cfg, key)
    for group in ("latency", "spectral", "scaling"):
        _flag(cfg, f"bench.{group}.enabled")
    _integer(cfg, "bench.latency.batch_size", 1)
    _integer(cfg, "bench.latency.iters", 1)
    _integer(cfg, "bench.latency.warmup", 0)
    _integer(cfg, "bench.latency.threads", 1, nullable=True)
    _number(cfg, "bench.latency.tolerance", 0.0, 1.0, lo_open=True, nullable=True)
    _number(cfg, "bench.latency.max_seconds", 0.0, math.inf, lo_open=True, nullable=True)
    _integer(cfg, "bench.latency.max_iters", 1)
    _number(cfg, "bench.scaling.max_seconds_per_point", 0.0, math.inf, lo_open=True, nullable=True)
    _integer(cfg, "bench.spectral.images", 1)
    _integer(cfg, "bench.spectral.bands", 1)
    _integer(cfg, "bench.scaling.batch_tokens", 1)
    _integer(cfg, "bench.scaling.iters", 1)
    _integer(cfg, "bench.scaling.warmup", 0)
    _integer(cfg, "bench.scaling.claim_resolution", 1)
    _integer(cfg, "model.img_size", 1, nullable=True)
    res = _get(cfg, "bench.scaling.resolutions")
    if res is not _MISSING:
        if not isinstance(res, (ListConfig, list)) or not res or not all(_is_int(s) and s > 0 for s in res):
            raise BenchError(f"bench.scaling.resolutions must be a non-empty list of positive integers, got {res!r}")
        if list(res) != sorted(set(res)):
            raise BenchError(f"bench.scaling.resolutions must be strictly increasing, got {list(res)}")


def validate_for_model(cfg: DictConfig, model: nn.Module) -> None:
    """Settings that depend on the model: every scaling resolution must be a whole number of patches."""
    sc = _get(cfg, "bench.scaling")
    if sc is _MISSING or not sc.get("enabled"):
        return
    patch = model.patch_embed.patch_size[0]
    bad = [s for s in sc.resolutions if s % patch]
    if bad:
        raise BenchError(
            f"bench.scaling.resolutions {bad} are not divisible by the patch size {patch} of {cfg.model.name}"
        )
