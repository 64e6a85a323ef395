"""Properties of the baseline reducers (pool, kmedoids, dpcknn, topk, random) on tiny random ViTs."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_reducer, tiny_distilled_vit, tiny_vit
from helpers import membership, patch_sizes, run_capturing

from bench.errors import BenchError
from methods import ReducerConfigError, apply_reducer
from methods.base import KeepRateReducer, ModelInfo, TokenState
from methods.dpcknn import density_peak_centres
from methods.kmedoids import kmedoids_groups
from methods.pool import pooled_grid
from methods.tokens import initial_state

NUM_PATCHES = 64  # tiny_vit: 8x8 grid

BASELINES = [
    ("pool", {"blocks": [1, 3]}),
    ("pool", {"blocks": [0, 2, 4], "keep_rate": [0.8, 0.5, 0.6]}),
    ("kmedoids", {"blocks": [1, 3], "keep_rate": 0.6}),
    ("kmedoids", {"blocks": [0, 2, 4], "keep_rate": [0.9, 0.5, 0.7], "iters": 2}),
    ("dpcknn", {"blocks": [1, 3], "keep_rate": 0.6}),
    ("dpcknn", {"blocks": [0, 2, 4], "keep_rate": [0.9, 0.5, 0.7], "k": 3}),
    ("topk", {"blocks": [1, 3], "keep_rate": 0.6}),
    ("random", {"blocks": [0, 2, 4], "keep_rate": [0.9, 0.5, 0.7], "seed": 3}),
]
PRUNING = {"topk", "random"}
NAMES = ["pool", "kmedoids", "dpcknn", "topk", "random"]


def make_model(variant):
    if variant == "distilled":
        return tiny_distilled_vit()
    kw = {"plain": {}, "registers": {"reg_tokens": 4}, "no_cls": {"global_pool": "avg", "class_token": False}}
    return tiny_vit(**kw[variant])


def assert_valid_step(name, kw, block, before, after):
    p = before.num_prefix
    n_in = before.num_tokens - p
    n_out = after.num_tokens - p
    assert after.x.shape[:2] == after.size.shape == after.pos.shape == after.source.shape[:2]
    # prefix tokens first and untouched, bit for bit
    assert torch.equal(after.x[:, :p], before.x[:, :p]), "prefix tokens changed"
    assert torch.equal(after.size[:, :p], before.size[:, :p])
    assert torch.equal(after.pos[:, :p], before.pos[:, :p])
    assert torch.all(after.source[:, :p] == 0)
    # the configured keep rate, exactly
    keeps = kw.get("keep_rate", 0.7)
    keep = keeps[kw["blocks"].index(block)] if isinstance(keeps, list) else keeps
    target = math.ceil(keep * n_in - 1e-9)
    if name == "pool":
        h, w = before.grid
        best = min(abs(a * b - target) for a in range(1, h + 1) for b in range(1, w + 1))
        assert after.grid is not None and after.grid[0] <= h and after.grid[1] <= w
        assert n_out == after.grid[0] * after.grid[1]
        assert abs(n_out - target) == best
    else:
        assert n_out == target
    src = after.source[:, p:]
    assert torch.allclose(src.sum(-1), patch_sizes(after)), "source map disagrees with sizes"
    cover = src.sum(1)
    member = membership(before, after)
    if name in PRUNING:
        assert torch.all((cover == 0) | (cover == 1)), "pruned source map must be a subset"
        # every kept token is one step-input token, copied exactly with its size
        assert torch.all(member.sum(-1) == 1)
        idx = member.argmax(-1) + p
        assert torch.equal(after.x[:, p:], before.x.gather(1, idx[..., None].expand(-1, -1, before.x.shape[-1])))
        assert torch.equal(after.size[:, p:], before.size.gather(1, idx))
        assert torch.allclose(patch_sizes(after).sum(-1), before.size[:, p:].gather(1, idx - p).sum(-1))
    else:
        assert torch.all(cover == 1), "source map must partition the grid"
        assert torch.allclose(patch_sizes(after).sum(-1), torch.full((before.x.shape[0],), float(NUM_PATCHES)))
        assert torch.all(patch_sizes(after) > 0), "no empty groups"
        # every step-input token went to exactly one output token, which is their weighted mean
        assert torch.all(member.sum(1) == 1)
        w = member * before.size[:, None, p:]
        expect = (w @ before.x[:, p:]) / w.sum(-1, keepdim=True)
        assert torch.allclose(after.x[:, p:], expect, atol=1e-5)
        assert torch.equal(w.sum(-1), after.size[:, p:])


@pytest.mark.parametrize("variant", ["plain", "distilled", "registers", "no_cls"])
@pytest.mark.parametrize("name,kw", BASELINES)
def test_baseline_properties(variant, name, kw, images):
    model = make_model(variant)
    reducer = build_reducer(name, **kw)
    if name == "topk" and model.num_prefix_tokens == 0:
        with pytest.raises(ReducerConfigError, match="class token"):
            apply_reducer(model, reducer)
        return
    logits, steps, ctx = run_capturing(model, reducer, images)
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    counts = reducer.token_counts(model.num_prefix_tokens, NUM_PATCHES, len(model.blocks))
    assert ctx.token_trace == [out for _, out in counts]
    assert [b for b, _, _ in steps] == kw["blocks"]
    for block, before, after in steps:
        assert_valid_step(name, kw, block, before, after)

    # determinism: a fresh reducer on the same input gives bit-identical results
    logits2, steps2, _ = run_capturing(model, build_reducer(name, **kw), images)
    assert torch.equal(logits, logits2)
    for (_, _, a), (_, _, b) in zip(steps, steps2, strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.size, b.size) and torch.equal(a.source, b.source)


@pytest.mark.parametrize("name,kw", BASELINES)
def test_batch_size_one(name, kw):
    model = tiny_vit()
    reducer = build_reducer(name, **kw)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    logits, steps, ctx = run_capturing(model, reducer, x)
    assert logits.shape == (1, 10) and torch.isfinite(logits).all()
    assert ctx.token_trace == [o for _, o in reducer.token_counts(1, NUM_PATCHES, 6)]
    for block, before, after in steps:
        assert_valid_step(name, kw, block, before, after)


@pytest.mark.parametrize("name,kw", BASELINES)
def test_bf16_autocast_runs(name, kw, images):
    model = tiny_vit()
    reducer = build_reducer(name, **kw)
    apply_reducer(model, reducer)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    assert torch.isfinite(out.float()).all()


def test_pool_keeps_updating_the_grid(images):
    reducer = build_reducer("pool", blocks=[0, 1, 2, 3, 4], keep_rate=0.7)
    _, steps, ctx = run_capturing(tiny_vit(), reducer, images)
    grids = [after.grid for _, _, after in steps]
    assert grids == [(6, 7), (5, 6), (4, 5), (3, 5), (3, 4)]
    assert grids == reducer.grids(NUM_PATCHES, 6)[:5]
    assert ctx.token_trace == [1 + h * w for h, w in grids] + [13]
    # count_step (replaying the grid from the bound model) agrees with the runtime too
    assert KeepRateReducer.token_counts(reducer, 1, NUM_PATCHES, 6) == reducer.token_counts(1, NUM_PATCHES, 6)
    # every pooled token covers a full rectangle of the image grid, in row-major order
    last = steps[-1][2]
    cover = last.source[0, 1:].reshape(-1, 8, 8) > 0
    corners = []
    for m in cover:
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        assert m[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
        assert m.sum() == len(rows) * len(cols)
        corners.append((int(rows.min()), int(cols.min())))
    assert corners == sorted(corners)


def test_pooled_grid_choice():
    assert pooled_grid(8, 8, 45) == (6, 7)  # 42 and 48 tie on size; 6x7 is squarer
    assert pooled_grid(14, 14, 138) == (10, 14)  # 140 is the closest size; 10x14 beats 14x10 on rows
    assert pooled_grid(4, 8, 8) == (2, 4)  # keeps the 1:2 aspect ratio
    assert pooled_grid(5, 5, 25) == (5, 5)


def _state(x, num_prefix=1, grid=None):
    b, n, _ = x.shape
    return initial_state(x, num_prefix, grid or (1, n - num_prefix), trace_source=True).replace(grid=grid)


def test_clear_errors():
    for name in NAMES:
        for bad in (0, 1.5, -0.1):
            with pytest.raises(BenchError, match="keep_rate must be in"):
                build_reducer(name, keep_rate=bad)
        with pytest.raises(ReducerConfigError, match="outside the model's depth"):
            apply_reducer(tiny_vit(), build_reducer(name, blocks=[2, 6]))
    pool = build_reducer("pool", blocks=[0])
    with pytest.raises(ReducerConfigError, match="grid is None"):
        pool.reduce(_state(torch.randn(2, 17, 8), grid=None), 0)
    with pytest.raises(BenchError, match="iters"):
        build_reducer("kmedoids", iters=-1)
    with pytest.raises(BenchError, match="nearest neighbours"):
        build_reducer("dpcknn", k=0)
    with pytest.raises(BenchError, match="seed"):
        build_reducer("random", seed=-2)
    with pytest.raises(BenchError, match="cannot build method 'topk': .*unexpected keyword argument 'fuse'"):
        build_reducer("topk", fuse=True)


@pytest.mark.parametrize("name", NAMES)
def test_budget_knob_rebuilds(name):
    reducer = build_reducer(name, blocks=[1, 2])
    other = reducer.with_knob(0.5)
    assert type(other) is type(reducer) and other.keep == {1: 0.5, 2: 0.5}
    assert other.hparams == {**reducer.hparams, "keep_rate": 0.5}


def test_keep_rate_one_changes_nothing(images):
    model = tiny_vit()
    with torch.no_grad():
        ref = model(images)
    for name in NAMES:
        logits, _, ctx = run_capturing(model, build_reducer(name, blocks=[1, 3], keep_rate=1.0), images)
        assert ctx.token_trace == [65] * 6
        assert (logits - ref).abs().max() < 1e-5, name


def test_random_pruning_seeds():
    x = torch.randn(4, 33, 8)
    kept = {}
    for seed in (0, 0, 1):
        r = build_reducer("random", blocks=[0], keep_rate=0.5, seed=seed)
        out = r.reduce(_state(x, grid=(4, 8)), 0)
        assert out.num_tokens == 17 and torch.equal(out.x[:, 0], x[:, 0])
        kept.setdefault(seed, []).append(out.x)
    assert torch.equal(kept[0][0], kept[0][1])
    assert not torch.equal(kept[0][0], kept[1][0])
    # block-dependent stream, and different images get different subsets
    r = build_reducer("random", blocks=[0, 1], keep_rate=0.5)
    a, b = r.reduce(_state(x, grid=(4, 8)), 0), r.reduce(_state(x, grid=(4, 8)), 1)
    assert not torch.equal(a.pos, b.pos)
    assert not torch.equal(a.pos[0], a.pos[1])


def _slow_kmedoids(x, w, k, iters):
    """Per-image, per-cluster k-medoids as described in methods/kmedoids.py."""
    out = []
    for xb, wb in zip(x.double(), w.double(), strict=True):
        n = xb.shape[0]
        d = torch.cdist(xb, xb)
        med = [i * n // k for i in range(k)]

        def assign(med, d=d, n=n):
            g = [min(range(len(med)), key=lambda c, i=i: (d[i, med[c]], c)) for i in range(n)]
            for c, m in enumerate(med):
                g[m] = c
            return g

        for _ in range(iters):
            g = assign(med)
            new = []
            for c in range(k):
                members = [i for i in range(n) if g[i] == c]
                costs = [(sum(float(wb[j] * d[i, j]) for j in members), i) for i in members]
                new.append(min(costs)[1])
            med = sorted(new)
        out.append(torch.tensor(assign(med)))
    return torch.stack(out)


def test_kmedoids_matches_slow_reference():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 30, 6, generator=g)
    w = torch.randint(1, 4, (3, 30), generator=g).float()
    for k, iters in [(9, 0), (9, 3), (17, 5)]:
        assert torch.equal(kmedoids_groups(x, w, k, iters), _slow_kmedoids(x, w, k, iters))


def _slow_dpc_centres(x, k_nn, num):
    out = []
    for xb in x.double():
        n, c = xb.shape
        d = torch.cdist(xb, xb) / c**0.5
        rho = [math.exp(-float((d[i].sort().values[:k_nn] ** 2).mean())) for i in range(n)]
        delta = []
        for i in range(n):
            higher = [float(d[i, j]) for j in range(n) if rho[j] > rho[i] or (rho[j] == rho[i] and j < i)]
            delta.append(min(higher) if higher else float(d.max()))
        score = [rho[i] * delta[i] for i in range(n)]
        out.append(torch.tensor(sorted(sorted(range(n), key=lambda i: (-score[i], i))[:num])))
    return torch.stack(out)


def test_dpcknn_matches_slow_reference():
    from methods.grouping import pairwise_sq_distances

    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 25, 6, generator=g)
    for k_nn, num in [(5, 10), (2, 18), (1, 3)]:
        centres = density_peak_centres(pairwise_sq_distances(x) / 6, k_nn, num)
        assert torch.equal(centres, _slow_dpc_centres(x, k_nn, num))


class _Step(torch.nn.Module):
    def __init__(self, reducer, block, num_prefix, grid):
        super().__init__()
        self.reducer, self.block, self.num_prefix, self.grid = reducer, block, num_prefix, grid

    def forward(self, x):
        state = initial_state(x, self.num_prefix, self.grid, trace_source=False)
        return self.reducer.reduce(state, self.block).x


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit deprecation, inside fvcore
@pytest.mark.parametrize("name", ["pool", "kmedoids", "dpcknn", "random"])
def test_overhead_macs_match_fvcore(name):
    from fvcore.nn import FlopCountAnalysis

    reducer = build_reducer(name, blocks=[2], keep_rate=0.6)
    reducer.bind(ModelInfo(depth=4, num_heads=3, embed_dim=48, num_prefix=1, patch_grid=(8, 8)))
    x = torch.randn(2, 65, 48)
    flops = FlopCountAnalysis(_Step(reducer, 2, 1, (8, 8)), (x,))
    flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    measured = flops.total() / x.shape[0]
    analytic = reducer.overhead_macs(2, 65, 48, 3)
    assert abs(measured - analytic) <= 0.02 * max(analytic, 1), (measured, analytic)
    if name in ("kmedoids", "dpcknn"):
        assert analytic == 64 * 64 * 48
    assert reducer.overhead_macs(1, 65, 48, 3) == 0


def test_topk_is_evit_without_fusion(images):
    model = tiny_vit()
    kw = {"blocks": [1, 3], "keep_rate": 0.6}
    a, _, _ = run_capturing(model, build_reducer("topk", **kw), images)
    b, _, _ = run_capturing(model, build_reducer("evit", fuse=False, **kw), images)
    assert torch.equal(a, b)
    assert build_reducer("topk").proportional_attention is False


def test_state_without_prefix_and_direct_call():
    # Reducers are plain functions of the state: they also work on a state built by hand.
    x = torch.randn(2, 16, 8)
    for name in ("pool", "kmedoids", "dpcknn", "random"):
        r = build_reducer(name, blocks=[0], keep_rate=0.25)
        out = r.reduce(_state(x, num_prefix=0, grid=(4, 4)), 0)
        assert out.num_tokens == 4
        assert torch.allclose(out.size.sum(-1), torch.full((2,), 4.0 if name == "random" else 16.0))
        assert isinstance(out, TokenState)
