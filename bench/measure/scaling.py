"""High-resolution scaling: how each method's cost grows with the number of tokens.

At each resolution the same reducer schedule (blocks and keep rates; ToMe's per-block ``r``
as solved at the base resolution) runs with timm's interpolated position embeddings.

- Tokens and GMACs come from the analytic count (:func:`bench.measure.flops.analytic_macs`, held
  within 2% of fvcore by the tests) at every resolution, up to the claim's 4096 px: free.
- Latency and peak memory (batch 1, and a batch that holds a fixed number of tokens) are
  measured only where one measurement is expected to cost at most ``max_seconds_per_point``,
  predicted from the unreduced model's time per GMAC at the last point it measured. The
  unreduced model decides the points, so every method is measured at the same resolutions;
  beyond them latency is extrapolated at the last measured point's time per GMAC and the row
  is marked ``extrapolated``.
- The unreduced model's latencies are measured once and kept in the measurement cache
  (:mod:`bench.measure.cache`); an entry measured on a busy machine is never reused, and the record
  says whether the entry came from the cache and when it was measured.

From the rows we fit ``cost ∝ tokensᵅ`` (over the measured points), find the resolution at
which the method is as slow as the unreduced model at the base resolution, and extrapolate
the latency at the claim's resolution.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from torch import nn
from tqdm.auto import tqdm

from bench.config import ScalingConfig
from bench.measure.busy import describe_busy
from bench.measure.cache import latency_key
from bench.measure.flops import VitShape, analytic_macs, fvcore_macs
from bench.measure.latency import time_forward
from bench.models import set_resolution
from bench.store import now_iso
from bench.terminal import say
from methods import ReducerConfigError, TokenReducer, apply_reducer, remove_reducer
from methods.identity import NoReduction
from methods.patch import model_info

if TYPE_CHECKING:
    from bench.measure.cache import MeasurementCache
    from bench.measure.subject import Measured, Subject


class _ScalingPointRequired(TypedDict):
    """What every stored scaling point has."""

    resolution: int
    tokens: int
    """Tokens entering the first block (patches plus prefix tokens)."""
    gmacs: float | None
    """Analytic count, or fvcore's where the reducer cannot count its tokens (see ``gmacs_source``)."""
    gmacs_unreduced: float | None
    latency_ms_b1: float | None
    """Batch-1 latency, measured or (``extrapolated``) at the last measured point's time per GMAC;
    None where neither is possible."""
    latency_ms_b1_unreduced: float | None
    speedup_b1: float | None


class ScalingPoint(_ScalingPointRequired, total=False):
    """One resolution of a method's scaling record (``metrics["scaling"]``, smallest first)."""

    extrapolated: bool
    """Latency not measured here (absent in records from before the time budget: all measured)."""
    gmacs_source: str | None
    """``analytic``, ``fvcore`` or None (absent in records from before the time budget)."""
    gmacs_analytic: float
    """Older records only: the analytic count next to fvcore's ``gmacs``."""
    peak_mem_mb_b1: float
    """Measured points only, as the batch fields below."""
    peak_mem_mb_b1_unreduced: float
    batch: int
    """Images in the batch that holds ``bench.scaling.batch_tokens`` tokens, where it was timed."""
    latency_ms_batch: float
    latency_ms_batch_unreduced: float
    speedup_batch: float
    peak_mem_mb_batch: float
    busy: bool
    """Measured points only: the method's timings here spread beyond ``BUSY_SPREAD`` and
    ``JITTER_MS``, or the load exceeded the CPUs (:func:`bench.measure.busy.describe_busy`);
    absent in records from before per-point flags."""
    busy_unreduced: bool
    """The same for the unreduced model's timings at this point."""


class _ScalingMetricsRequired(TypedDict):
    """What every stored scaling record has."""

    scaling: list[ScalingPoint]
    claim_resolution: int
    claim_latency_ms_extrapolated: float
    """Latency at ``claim_resolution``: measured there, else at the last measured point's time per GMAC."""
    claim_latency_vs_base: float
    """That latency over the unreduced model's at the smallest resolution."""


class ScalingMetrics(_ScalingMetricsRequired, total=False):
    """What :func:`scaling_metrics` adds to a record's metrics, and what every reader may rely on.

    The keys of this class (not of its required base) are missing from some stored records
    (older versions of the harness, or a single resolution before the fits were always
    written): readers use ``.get`` for them."""

    alpha_latency: float
    """Exponent of ``latency ∝ tokensᵅ`` over the measured points; NaN with fewer than two."""
    alpha_latency_unreduced: float
    alpha_gmacs: float
    alpha_gmacs_unreduced: float
    resolution_at_base_latency: float
    """Where the method is as slow as the unreduced model at the base resolution; NaN: slower already there."""
    resolution_at_base_latency_extrapolated: bool
    claim_measured: bool
    scaling_budget_s: float | None
    """``max_seconds_per_point`` (absent in records from before the time budget)."""
    scaling_measured_resolutions: list[int]
    scaling_unreduced_from_cache: bool
    scaling_unreduced_measured_at: str
    scaling_unreduced_busy_reason: str | None
    scaling_busy: bool
    scaling_busy_reason: str | None


def at_resolution(model: nn.Module, reducer: TokenReducer, size: int) -> nn.Module:
    m = copy.deepcopy(model)
    remove_reducer(m)
    set_resolution(m, size)
    return apply_reducer(m, copy.deepcopy(reducer))


def power_law(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares fit of ``log y = α log x + c``; returns ``(α, c)``."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    n = len(lx)
    mx, my = sum(lx) / n, sum(ly) / n
    var = sum((a - mx) ** 2 for a in lx)
    alpha = sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / var if var else float("nan")
    return alpha, my - alpha * mx


def crossing_resolution(sizes: list[int], latency: list[float], target: float) -> tuple[float, bool]:
    """Resolution where ``latency`` first reaches ``target`` (log-log interpolation between
    points); beyond the last point, extrapolated from the last two. Returns
    ``(resolution, extrapolated)``."""
    pts = list(zip(sizes, latency, strict=True))
    for (s0, l0), (s1, l1) in zip(pts, pts[1:], strict=False):
        if l0 <= target <= l1:
            t = (math.log(target) - math.log(l0)) / (math.log(l1) - math.log(l0)) if l1 != l0 else 0.0
            return math.exp(math.log(s0) + t * (math.log(s1) - math.log(s0))), False
    if latency[0] > target:
        return float("nan"), False  # slower than the target already at the smallest size
    if len(pts) < 2:
        return float("nan"), True
    (s0, l0), (s1, l1) = pts[-2], pts[-1]
    slope = (math.log(l1) - math.log(l0)) / (math.log(s1) - math.log(s0))
    if slope <= 0:
        return float("inf"), True
    return math.exp(math.log(s1) + (math.log(target) - math.log(l1)) / slope), True


def tokens_at(model: nn.Module, size: int) -> int:
    patch = model.patch_embed.patch_size[0]
    return (size // patch) ** 2 + model.num_prefix_tokens


def analytic_gmacs(model: nn.Module, reducer: TokenReducer, size: int) -> float | None:
    """GMACs per image at ``size`` from the analytic count, without building the model; None
    for a reducer that cannot count its tokens (no ``token_counts``) or cannot run there."""
    if type(reducer).token_counts is TokenReducer.token_counts and not isinstance(reducer, NoReduction):
        return None
    grid = size // model.patch_embed.patch_size[0]
    bound = copy.deepcopy(reducer)
    try:
        bound.bind(replace(model_info(model), patch_grid=(grid, grid)))
    except ReducerConfigError:
        return None
    return analytic_macs(VitShape.of(model), bound, grid * grid) / 1e9


def _forwards(warmup: int, iters: int) -> int:
    """Forwards one timed point costs: warm-up and timed iterations; the memory pass is the last
    warm-up forward, and one more only without warm-up (see ``latency.time_forward``)."""
    return warmup + iters + (0 if warmup else 1)


def measure_points(
    model: nn.Module,
    reducer: TokenReducer,
    sizes: list[int],
    device: torch.device,
    batch_tokens: int,
    warmup: int,
    iters: int,
    amp: bool,
    threads: int | None,
    max_seconds_per_point: float | None = None,
    plan: dict[int, bool] | None = None,
    bar: tqdm | None = None,
) -> dict[int, dict[str, Any]]:
    """Batch-1 (and batch-of-tokens) latency and memory at each size, smallest first.

    Without ``plan`` the budget decides: the first size is always measured, every later one
    only while ``(warm-up + iterations + 1) × predicted forward`` fits ``max_seconds_per_point``,
    the forward predicted from the last measured point's seconds per GMAC; the batch
    measurement of a size likewise. With ``plan`` ({size: measure the batch too}) exactly
    those points are measured, so reduced and unreduced share their resolutions."""
    rows: dict[int, dict[str, Any]] = {}
    per_gmac = None  # seconds per GMAC at batch 1, at the last measured size
    n = _forwards(warmup, iters)
    for size in sizes:
        gmacs = analytic_gmacs(model, reducer, size)
        if plan is not None:
            if size not in plan:
                continue
        elif rows and max_seconds_per_point is not None:
            if per_gmac is None or gmacs is None or n * per_gmac * gmacs > max_seconds_per_point:
                break  # sizes only grow: every later point costs more
        m = at_resolution(model, reducer, size).to(device)
        x1 = torch.randn(1, 3, size, size, device=device)
        one = time_forward(m, x1, warmup, iters, amp, threads)
        row: dict[str, Any] = {"latency_ms_b1": one["ms"], "peak_mem_mb_b1": one["peak_mem_mb"]}
        row.update(load=one["load"], spread=one["spread"])
        if gmacs is None:  # a reducer without token_counts: fvcore where it is measured
            gmacs = fvcore_macs(m, x1) / 1e9
            row["gmacs_fvcore"] = gmacs
        per_gmac = one["ms"] / 1e3 / gmacs
        batch = max(1, batch_tokens // tokens_at(model, size))
        wanted = plan[size] if plan is not None else batch > 1
        if wanted and (
            plan is not None or max_seconds_per_point is None or n * batch * one["ms"] / 1e3 <= max_seconds_per_point
        ):
            xb = torch.randn(batch, 3, size, size, device=device)
            many = time_forward(m, xb, warmup, iters, amp, threads)
            row.update(batch=batch, latency_ms_batch=many["ms"], peak_mem_mb_batch=many["peak_mem_mb"])
            row.update(load=_max(row["load"], many["load"]), spread=max(row["spread"], many["spread"]))
        row["busy"] = describe_busy(device, row["load"], row["spread"]) is not None
        rows[size] = row
        del m
        if bar is not None:
            bar.update(1)
    return rows


def unreduced_points(
    model: nn.Module,
    sizes: list[int],
    device: torch.device,
    batch_tokens: int,
    warmup: int,
    iters: int,
    amp: bool,
    threads: int | None,
    max_seconds_per_point: float | None,
    bar: tqdm | None = None,
) -> dict[str, Any]:
    """The unreduced model's measured points, as stored in the measurement cache (each with its
    busy flag; entries from before the flags have none, and were quiet as a whole)."""
    rows = measure_points(
        model, NoReduction(), sizes, device, batch_tokens, warmup, iters, amp, threads, max_seconds_per_point, None, bar
    )
    return {
        "rows": {str(s): {k: v for k, v in r.items() if k not in ("load", "spread")} for s, r in rows.items()},
        "measured_at": now_iso(),
        "busy": _busy(device, rows),
    }


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def _busy(device: torch.device, rows: dict[int, dict[str, Any]]) -> str | None:
    """One busy reason over all measured points: the highest load, the widest spread."""
    load = None
    for r in rows.values():
        load = _max(load, r["load"])
    spread = max((r["spread"] for r in rows.values()), default=0.0)
    return describe_busy(device, load, spread)


def scaling_metrics(
    model: nn.Module,
    reducer: TokenReducer,
    resolutions: list[int],
    device: torch.device,
    batch_tokens: int = 6304,
    warmup: int = 1,
    iters: int = 3,
    amp: bool = False,
    threads: int | None = None,
    claim_resolution: int = 4096,
    show_progress: bool = True,
    max_seconds_per_point: float | None = None,
    cache: MeasurementCache | None = None,
    compile_mode: str = "eager",
) -> ScalingMetrics:
    """Every scaling number of one method (see the module docstring).

    Args:
        model: the ViT at its base resolution (patched or not; its weights are the reference).
        reducer: the method, as solved at the base resolution.
        resolutions: increasing image sizes; the first is the base.
        device: where to time.
        batch_tokens: the "batch that fits" holds this many tokens.
        warmup, iters, amp, threads: timing settings of every point.
        claim_resolution: the size at which the "as fast as the unreduced model at the base
            resolution" claim is checked (by extrapolation unless measured).
        show_progress: a bar over the measured points.
        max_seconds_per_point: the budget of one measured point; None measures every size.
        cache: a :class:`bench.measure.cache.MeasurementCache` for the unreduced model's points.
        compile_mode: the job's ``bench.latency.compile``; scaling times eager forwards, but its
            cache entries are kept apart by mode (:func:`bench.measure.cache.latency_key`).
    """
    sizes = list(resolutions)
    bar = tqdm(desc="scaling", disable=not show_progress, leave=False, unit="point")
    settings = {
        "resolutions": sizes,
        "batch_tokens": batch_tokens,
        "warmup": warmup,
        "iters": iters,
        **latency_key(amp, threads, compile_mode),
        "max_seconds_per_point": max_seconds_per_point,
    }

    def measure_unreduced() -> dict[str, Any]:
        return unreduced_points(
            model, sizes, device, batch_tokens, warmup, iters, amp, threads, max_seconds_per_point, bar
        )

    if cache is not None:
        ref, from_cache = cache.get_or_compute(
            "scaling_unreduced", settings, measure_unreduced, reusable=lambda v: v.get("busy") is None
        )
    else:
        ref, from_cache = measure_unreduced(), False
    ref_rows = {int(s): r for s, r in ref["rows"].items()}
    plan = {s: "latency_ms_batch" in r for s, r in ref_rows.items()}
    red_rows = measure_points(model, reducer, sizes, device, batch_tokens, warmup, iters, amp, threads, None, plan, bar)
    bar.close()
    rows = _rows(model, reducer, sizes, red_rows, ref_rows)
    busy = _busy(device, red_rows)
    out: ScalingMetrics = {
        "scaling": rows,
        "scaling_budget_s": max_seconds_per_point,
        "scaling_measured_resolutions": sorted(red_rows),
        "scaling_unreduced_from_cache": from_cache,
        "scaling_unreduced_measured_at": ref["measured_at"],
        "scaling_unreduced_busy_reason": ref["busy"],
        "scaling_busy": busy is not None,
        "scaling_busy_reason": busy,
    }
    out.update(_fits(model, reducer, rows, claim_resolution))
    return out


def _rows(
    model: nn.Module,
    reducer: TokenReducer,
    sizes: list[int],
    red: dict[int, dict[str, Any]],
    ref: dict[int, dict[str, Any]],
) -> list[ScalingPoint]:
    """One row per size: measured latencies where both models were timed, the rest
    extrapolated at the last measured point's time per GMAC (marked ``extrapolated``)."""
    rows: list[ScalingPoint] = []
    last: ScalingPoint | None = None
    for size in sizes:
        g = analytic_gmacs(model, reducer, size)
        g_ref = analytic_gmacs(model, NoReduction(), size)
        row: ScalingPoint = {  # the latencies follow
            "resolution": size,
            "tokens": tokens_at(model, size),
            "gmacs": g if g is not None else red.get(size, {}).get("gmacs_fvcore"),
            "gmacs_unreduced": g_ref,
            "gmacs_source": "analytic" if g is not None else ("fvcore" if size in red else None),
        }
        if size in red and size in ref:
            r, u = red[size], ref[size]
            row.update(
                extrapolated=False,
                latency_ms_b1=r["latency_ms_b1"],
                latency_ms_b1_unreduced=u["latency_ms_b1"],
                speedup_b1=u["latency_ms_b1"] / r["latency_ms_b1"],
                peak_mem_mb_b1=r["peak_mem_mb_b1"],
                peak_mem_mb_b1_unreduced=u["peak_mem_mb_b1"],
                busy=bool(r.get("busy")),
                busy_unreduced=bool(u.get("busy")),
            )
            if "latency_ms_batch" in r and "latency_ms_batch" in u:
                row.update(
                    batch=r["batch"],
                    latency_ms_batch=r["latency_ms_batch"],
                    latency_ms_batch_unreduced=u["latency_ms_batch"],
                    speedup_batch=u["latency_ms_batch"] / r["latency_ms_batch"],
                    peak_mem_mb_batch=r["peak_mem_mb_batch"],
                )
            last = row
        else:
            row["extrapolated"] = True
            if last is not None and row["gmacs"] and last["gmacs"]:
                row["latency_ms_b1"] = last["latency_ms_b1"] * row["gmacs"] / last["gmacs"]
                row["latency_ms_b1_unreduced"] = last["latency_ms_b1_unreduced"] * g_ref / last["gmacs_unreduced"]
                row["speedup_b1"] = row["latency_ms_b1_unreduced"] / row["latency_ms_b1"]
            else:
                row.update(latency_ms_b1=None, latency_ms_b1_unreduced=None, speedup_b1=None)
        rows.append(row)
    return rows


def _fits(model: nn.Module, reducer: TokenReducer, rows: list[ScalingPoint], claim_resolution: int) -> dict[str, Any]:
    """α over the measured rows, the resolution at the base latency, and the claim."""
    nan = float("nan")
    measured = [r for r in rows if not r["extrapolated"]]
    out: dict[str, Any] = {}
    tokens = [r["tokens"] for r in measured]
    if len(measured) >= 2:
        out["alpha_latency"] = power_law(tokens, [r["latency_ms_b1"] for r in measured])[0]
        out["alpha_latency_unreduced"] = power_law(tokens, [r["latency_ms_b1_unreduced"] for r in measured])[0]
        out["alpha_gmacs"] = power_law(tokens, [r["gmacs"] for r in measured])[0]
        out["alpha_gmacs_unreduced"] = power_law(tokens, [r["gmacs_unreduced"] for r in measured])[0]
    else:
        out.update(alpha_latency=nan, alpha_latency_unreduced=nan, alpha_gmacs=nan, alpha_gmacs_unreduced=nan)
    base = measured[0]["latency_ms_b1_unreduced"]
    known = [r for r in rows if r["latency_ms_b1"] is not None]
    res, beyond = crossing_resolution([r["resolution"] for r in known], [r["latency_ms_b1"] for r in known], base)
    out["resolution_at_base_latency"] = res
    out["resolution_at_base_latency_extrapolated"] = beyond or (
        not math.isnan(res) and res > measured[-1]["resolution"]
    )
    # The "4K at 224 latency" claim: the latency at the claim's size, at the last measured
    # point's time per GMAC (attention's quadratic cost included, unlike a power law in tokens).
    out["claim_resolution"] = claim_resolution
    at_claim = next((r for r in rows if r["resolution"] == claim_resolution), None)
    last = measured[-1]
    if at_claim is not None and at_claim["latency_ms_b1"] is not None:
        claim_ms = at_claim["latency_ms_b1"]
    else:
        g = analytic_gmacs(model, reducer, claim_resolution)
        claim_ms = last["latency_ms_b1"] * g / last["gmacs"] if g and last["gmacs"] else nan
    out["claim_latency_ms_extrapolated"] = claim_ms
    out["claim_latency_vs_base"] = claim_ms / base
    out["claim_measured"] = bool(at_claim is not None and not at_claim["extrapolated"])
    return out


def scaling_job(section: ScalingConfig, subject: Subject, out: Measured) -> None:
    """A reduced model's cost from the base resolution up to the claim's (``bench.scaling``),
    timed with the latency settings' autocast and threads."""
    s, sc = subject, section
    metrics = scaling_metrics(
        s.model,
        s.reducer,
        list(sc.resolutions),
        s.device,
        sc.batch_tokens,
        sc.warmup,
        sc.iters,
        s.amp,
        s.threads,
        sc.claim_resolution,
        s.progress,
        sc.max_seconds_per_point,
        s.cache,
        s.latency_compile,
    )
    out.metrics.update(metrics)
    if metrics.get("scaling_busy"):
        say(f"warning: {s.name}: scaling latency measured on a busy machine ({metrics['scaling_busy_reason']})")
