"""Shared fixtures: tiny random ViTs for fast property tests, and the real DeiT-Tiny.

Tests that need the real weights and images read them from ``FATR_SHARED`` (default
``../shared`` beside the checkout) and skip with the reason when they are absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf

from bench.measure.busy import cpu_count
from methods import TokenReducer

REPO = Path(__file__).resolve().parents[1]
METHOD_CONF = REPO / "bench" / "conf" / "method"
SHARED = Path(os.environ.get("FATR_SHARED", REPO.parent / "shared"))
WEIGHTS = SHARED / "weights" / "deit_tiny_patch16_224.safetensors"
VAL = SHARED / "data" / "imagenet-val-1300"
CALIB = SHARED / "data" / "imagenet-calib-1000"


TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=6, num_heads=3, num_classes=10)


def tiny_vit(**kw) -> torch.nn.Module:
    """A 6-block ViT on a 8x8 patch grid (64 patches): fast, but deep enough for schedules."""
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(**{**TINY, **kw}).eval()


def tiny_distilled_vit(**kw) -> torch.nn.Module:
    """:func:`tiny_vit` as a distilled DeiT: class and distillation token (2 prefix tokens)."""
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    return VisionTransformerDistilled(**{**TINY, **kw}).eval()


def method_names() -> list[str]:
    """Every method the harness offers: the files of the Hydra method group."""
    return sorted(p.stem for p in METHOD_CONF.glob("*.yaml"))


def one_config_per_reducer() -> list[str]:
    """Method configs, one per reducer class: ``diffrate_deit_s`` and ``diffrate_deit_b`` run
    DiffRate's code with other schedules, which behave as ``diffrate`` does."""
    seen: dict[str, str] = {}
    for name in method_names():
        seen.setdefault(OmegaConf.load(METHOD_CONF / f"{name}.yaml").reducer._target_, name)
    return sorted(seen.values())


def knob_cases() -> list[tuple[str, str]]:
    """``(method, knob)`` for every reducer class (:func:`one_config_per_reducer`): its default
    knob, and its knob solved for a budget (``none`` has none)."""
    return [(n, k) for n in one_config_per_reducer() for k in ("default", "budget") if n != "none" or k == "default"]


def reducer_at(name: str, knob: str, model: torch.nn.Module) -> TokenReducer:
    """``method=<name>`` at its default knob (``knob="default"``) or with the knob solved for
    MACs 0.65 on ``model`` (``"budget"``, as the sweeps run it; a method without a knob skips)."""
    from bench.budget import solve_budget

    reducer = build_reducer(name)
    if knob == "budget":
        if reducer.budget_knob is None:
            pytest.skip(f"{name} has no budget knob")
        reducer, _ = solve_budget(reducer, 0.65, 0.02, model, name)
    return reducer


def method_arguments(name: str) -> set[str]:
    """The reducer arguments ``bench/conf/method/<name>.yaml`` sets (``blocks``, ``keep_rate``, ...)."""
    return set(OmegaConf.load(METHOD_CONF / f"{name}.yaml").reducer) - {"_target_"}


def build_reducer(name: str, **overrides) -> TokenReducer:
    """``method=<name>`` built the way ``bench.run`` builds it: ``bench/conf/method/<name>.yaml``
    with ``overrides`` set in its ``reducer`` section, through
    :func:`bench.job.build_reducer_from_config` (bad arguments: one ``BenchError``)."""
    from bench.job import build_reducer_from_config

    path = METHOD_CONF / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"no method config {path}; methods: {', '.join(method_names())}")
    cfg = OmegaConf.load(path)
    for key, value in overrides.items():
        cfg.reducer[key] = value
    return build_reducer_from_config(cfg)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny models (``pytestmark =
    pytest.mark.usefixtures("one_torch_thread")``): a 48-wide ViT gains nothing from a second
    thread, and on a shared, loaded 2-core machine two spinning threads made each forward
    50-100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def vit():
    return tiny_vit()


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 32, 32, generator=g)


def _need_shared():
    """Skip where the real data is absent (a user's machine); fail where CI requires it."""
    missing = [p for p in (WEIGHTS, VAL, CALIB) if not p.exists()]
    if missing:
        reason = f"real data not found: {', '.join(map(str, missing))} (set FATR_SHARED)"
        if os.environ.get("FATR_REQUIRE_SHARED") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def deit_tiny():
    _need_shared()
    from bench.models import load_model

    return load_model("deit_tiny_patch16_224", checkpoint=str(WEIGHTS))


@pytest.fixture(scope="session")
def val_batch():
    """The first 64 real validation images (sorted paths) and labels, model transform applied."""
    _need_shared()
    from bench.data import load_imagenet_folder

    ds = load_imagenet_folder(str(VAL), "deit_tiny_patch16_224", limit=64, show_progress=False)
    return ds.images, ds.labels


def pytest_configure(config):
    """In an xdist worker, torch gets the worker's share of the cores (and so do the
    ``bench.run`` processes tests start, through ``OMP_NUM_THREADS``). Each process's torch
    would otherwise take every core: two workers on two cores ran four spinning OpenMP threads,
    and a job that takes 6 s alone took 54 s in the suite."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return
    share = max(1, cpu_count() // int(workers))
    torch.set_num_threads(share)
    os.environ.setdefault("OMP_NUM_THREADS", str(share))


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): two test processes, or up to four on a bigger machine.
    Most of the suite's time is single-threaded (a ``bench.run`` process starting, tracing a
    model), so two workers on two cores take it from about 11 minutes to under 7, each with one
    torch thread (:func:`pytest_configure`); more than four would each hold a torch process's
    memory for little gain. No workers (0) for
    ``--benchmark-only``: pytest-benchmark times nothing under xdist, and timings taken next to
    another worker would be noise."""
    if config.getoption("benchmark_only", False):
        return 0
    return max(2, min(4, cpu_count()))


def pytest_collection_modifyitems(config, items):
    """Deselect, rather than skip, the tests a benchmark mode leaves out, so that neither
    ``pytest`` (``--benchmark-skip``) nor ``pytest --benchmark-only`` prints a SKIPPED line per
    test: the skips that remain are the ones worth reading (e.g. missing ``../shared``)."""
    only = config.getoption("benchmark_only", False)
    skip = config.getoption("benchmark_skip", False) and not only
    if not (only or skip):
        return
    keep, drop = [], []
    for item in items:
        is_benchmark = "benchmark" in getattr(item, "fixturenames", ())
        (keep if is_benchmark == only else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
