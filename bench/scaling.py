"""High-resolution scaling: how each method's cost grows with the number of tokens.

At each resolution the same reducer schedule (blocks and keep rates; ToMe's per-block ``r``
as solved at the base resolution) runs with timm's interpolated position embeddings. We
measure tokens, GMACs (fvcore and analytic), latency and peak memory at batch 1 and at a
batch that holds a fixed number of tokens, fit ``cost ∝ tokensᵅ``, and find the resolution
at which the method is as slow as the unreduced model at the base resolution.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from bench.flops import fvcore_macs, macs_report
from bench.latency import measure_latency
from bench.models import set_resolution
from methods import TokenReducer, apply_reducer, remove_reducer
from methods.identity import NoReduction
from methods.patch import model_info


def at_resolution(model: nn.Module, reducer: TokenReducer, size: int) -> nn.Module:
    m = copy.deepcopy(model)
    remove_reducer(m)
    set_resolution(m, size)
    return apply_reducer(m, reducer)


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
    measured points); beyond the last point, extrapolated from the last two. Returns
    ``(resolution, extrapolated)``."""
    pts = list(zip(sizes, latency, strict=True))
    for (s0, l0), (s1, l1) in zip(pts, pts[1:], strict=False):
        if l0 <= target <= l1:
            t = (math.log(target) - math.log(l0)) / (math.log(l1) - math.log(l0)) if l1 != l0 else 0.0
            return math.exp(math.log(s0) + t * (math.log(s1) - math.log(s0))), False
    if latency[0] > target:
        return float("nan"), False  # slower than the target already at the smallest size
    (s0, l0), (s1, l1) = pts[-2], pts[-1]
    slope = (math.log(l1) - math.log(l0)) / (math.log(s1) - math.log(s0))
    if slope <= 0:
        return float("inf"), True
    return math.exp(math.log(s1) + (math.log(target) - math.log(l1)) / slope), True


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
) -> dict[str, Any]:
    rows = []
    for size in tqdm(resolutions, desc="scaling", disable=not show_progress, leave=False):
        red = at_resolution(model, reducer, size).to(device)
        ref = at_resolution(model, NoReduction(), size).to(device)
        info = model_info(red)
        tokens = info.num_prefix + info.num_patches
        x1 = torch.randn(1, 3, size, size, device=device)
        row: dict[str, Any] = {
            "resolution": size,
            "tokens": tokens,
            **macs_report(red, reducer, x1),
            "gmacs_unreduced": fvcore_macs(ref, x1) / 1e9,
        }
        lat1 = measure_latency(red, ref, x1, warmup, iters, amp, threads, show_progress=False)
        row.update(
            latency_ms_b1=lat1["latency_ms"],
            latency_ms_b1_unreduced=lat1["latency_ms_baseline"],
            speedup_b1=lat1["speedup"],
            peak_mem_mb_b1=lat1["peak_mem_mb"],
            peak_mem_mb_b1_unreduced=lat1["peak_mem_mb_baseline"],
        )
        batch = max(1, batch_tokens // tokens)
        if batch > 1:
            xb = torch.randn(batch, 3, size, size, device=device)
            latb = measure_latency(red, ref, xb, warmup, iters, amp, threads, show_progress=False)
            row.update(
                batch=batch,
                latency_ms_batch=latb["latency_ms"],
                latency_ms_batch_unreduced=latb["latency_ms_baseline"],
                speedup_batch=latb["speedup"],
                peak_mem_mb_batch=latb["peak_mem_mb"],
            )
        rows.append(row)
        del red, ref
    tokens = [r["tokens"] for r in rows]
    out: dict[str, Any] = {"scaling": rows}
    if len(rows) >= 2:
        out["alpha_latency"] = power_law(tokens, [r["latency_ms_b1"] for r in rows])[0]
        out["alpha_latency_unreduced"] = power_law(tokens, [r["latency_ms_b1_unreduced"] for r in rows])[0]
        out["alpha_gmacs"] = power_law(tokens, [r["gmacs"] for r in rows])[0]
        out["alpha_gmacs_unreduced"] = power_law(tokens, [r["gmacs_unreduced"] for r in rows])[0]
        base = rows[0]["latency_ms_b1_unreduced"]
        res, extrapolated = crossing_resolution(resolutions, [r["latency_ms_b1"] for r in rows], base)
        out["resolution_at_base_latency"] = res
        out["resolution_at_base_latency_extrapolated"] = extrapolated
        # The "4K at 224 latency" claim, checked against a power law fitted on the largest sizes.
        tail = rows[-3:]
        a, c = power_law([r["tokens"] for r in tail], [r["latency_ms_b1"] for r in tail])
        patch = model.patch_embed.patch_size[0]
        claim_tokens = (claim_resolution // patch) ** 2 + model.num_prefix_tokens
        out["claim_resolution"] = claim_resolution
        out["claim_latency_ms_extrapolated"] = math.exp(c) * claim_tokens**a
        out["claim_latency_vs_base"] = out["claim_latency_ms_extrapolated"] / base
    return out
