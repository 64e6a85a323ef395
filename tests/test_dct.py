"""DCT token reduction (methods/dct.py): the transform on hand-made inputs, the reference's
schedule, the shared reducer invariants, budgets, one-graph capture and bad knobs."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from conftest import build_reducer, tiny_distilled_vit, tiny_vit
from helpers import patch_sizes, run_capturing

from bench.budget import match_budget
from bench.errors import BenchError
from bench.measure.flops import VitShape, analytic_macs, fvcore_macs
from bench.measure.spectral_metrics import scatter_to_grid
from methods import ReducerConfigError, apply_reducer, reduction_context
from methods.dct import (
    _CONSTANTS,
    DCT,
    DENSE_MAX_TOKENS,
    dct_matrix,
    dct_operator,
    dct_phase,
    dct_plan,
    dct_resample,
    dct_resample_fft,
    dct_resample_matrix,
    merge_schedule,
    overlap_matrix,
)
from methods.patch import model_info

NUM_PATCHES = 64  # tiny_vit: 8x8 grid
F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cosine(k: int, n: int) -> torch.Tensor:
    """The k-th DCT-II basis cosine sampled on n cell centres, unnormalised."""
    i = torch.arange(n, dtype=F64)
    return torch.cos(math.pi * k * (2 * i + 1) / (2 * n))


# -- the transform -------------------------------------------------------------------------------


def test_dct_matrix_is_orthonormal_dct_ii():
    c = dct_matrix(7)
    torch.testing.assert_close(c @ c.T, torch.eye(7, dtype=F64))
    # row k is the k-th cosine, scaled by sqrt(1/n) (k = 0) or sqrt(2/n)
    torch.testing.assert_close(c[0], torch.full((7,), 1 / math.sqrt(7), dtype=F64))
    torch.testing.assert_close(c[3], cosine(3, 7) * math.sqrt(2 / 7))


@pytest.mark.parametrize("route", [dct_resample, dct_resample_fft], ids=["dense", "fft"])
@pytest.mark.parametrize("n,n_out", [(196, 188), (196, 98), (64, 33), (7, 4), (8, 1), (5, 5)])
def test_both_routes_are_the_truncated_scaled_dct(route, n, n_out):
    """The dense and the FFT route each equal ``√(T'/T)·C_T'ᵀ·C_T[:T']`` applied to every
    channel, in float64 (to rounding) and float32 (to float32 precision), along any axis."""
    m = dct_resample_matrix(n, n_out)
    x = torch.randn(3, n, 5, dtype=F64, generator=torch.Generator().manual_seed(n))
    want = torch.einsum("ot,btc->boc", m, x)
    torch.testing.assert_close(route(x, n_out, dim=1), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(route(x.float(), n_out, dim=1).double(), want, rtol=0, atol=2e-5)
    xt = x.transpose(1, 2).contiguous()  # the same along the last axis
    torch.testing.assert_close(route(xt, n_out, dim=-1), want.transpose(1, 2), rtol=0, atol=1e-12)
    grid = x.reshape(3, n, 1, 5).expand(3, n, 2, 5)  # and along a middle axis of a 4-D grid
    torch.testing.assert_close(route(grid, n_out, dim=1), want[:, :, None].expand(3, n_out, 2, 5), rtol=0, atol=1e-12)


def test_short_sequences_take_the_dense_operator_and_long_ones_the_fft():
    """The dense operator (a cached float32 matrix, one product) up to DENSE_MAX_TOKENS, where
    it is the faster route on a CPU; the FFT above, where the operator grows as T²."""
    gen = torch.Generator().manual_seed(0)
    short = torch.randn(2, DENSE_MAX_TOKENS, 3, generator=gen)
    op = dct_operator(DENSE_MAX_TOKENS, 300, short.device, torch.float32)
    assert op is dct_operator(DENSE_MAX_TOKENS, 300, short.device, torch.float32)
    assert torch.equal(dct_resample(short, 300), torch.matmul(op, short))
    long = torch.randn(2, DENSE_MAX_TOKENS + 1, 3, generator=gen)
    assert torch.equal(dct_resample(long, 300), dct_resample_fft(long, 300))
    assert not any(k[:2] == ("operator", DENSE_MAX_TOKENS + 1) for k in _CONSTANTS)


def test_a_constant_sequence_stays_the_same_constant():
    """The brief's test: the plain truncated orthonormal inverse (the reference) turns c into
    c·√(T/T'); the scaled one keeps c, in every dtype."""
    for n, n_out in [(196, 188), (196, 98), (9, 2)]:
        const = torch.full((1, n, 4), 2.5, dtype=F64)
        plain = torch.einsum("ot,btc->boc", dct_resample_matrix(n, n_out, scaled=False), const)
        torch.testing.assert_close(plain, torch.full_like(plain, 2.5 * math.sqrt(n / n_out)))
        torch.testing.assert_close(dct_resample(const, n_out, rescale=False), plain)  # the reference's variant
        for dtype, tol in [(F64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 0.0)]:
            out = dct_resample(const.to(dtype), n_out, dim=1)
            assert out.dtype == dtype and out.shape == (1, n_out, 4)
            torch.testing.assert_close(out.double(), torch.full((1, n_out, 4), 2.5, dtype=F64), rtol=0, atol=tol)


def test_every_coefficient_had_the_same_scale_error():
    """Not only the DC term: the plain inverse maps the k-th cosine on T points to √(T/T') times
    the k-th cosine on T' points, for every kept k; the scaled one maps it to exactly that
    cosine (band-limited resampling). Rows of M sum to 1, columns to T'/T."""
    n, n_out = 20, 12
    plain, scaled = dct_resample_matrix(n, n_out, scaled=False), dct_resample_matrix(n, n_out)
    for k in range(n_out):
        torch.testing.assert_close(plain @ cosine(k, n), math.sqrt(n / n_out) * cosine(k, n_out))
        torch.testing.assert_close(scaled @ cosine(k, n), cosine(k, n_out))
    # frequencies at or above T' are removed entirely
    for k in range(n_out, n):
        torch.testing.assert_close(scaled @ cosine(k, n), torch.zeros(n_out, dtype=F64))
    torch.testing.assert_close(scaled.sum(1), torch.ones(n_out, dtype=F64))
    torch.testing.assert_close(scaled.sum(0), torch.full((n,), n_out / n, dtype=F64))


def test_2d_resampling_is_separable_and_keeps_a_smooth_grid_smooth():
    h, w, ho, wo = 6, 8, 4, 5
    grid = torch.randn(2, h, w, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    got = dct_resample(dct_resample(grid, ho, dim=1), wo, dim=2)
    kron = torch.kron(dct_resample_matrix(h, ho), dct_resample_matrix(w, wo))  # row-major 2-D operator
    want = torch.einsum("ot,btc->boc", kron, grid.reshape(2, h * w, 3)).reshape(2, ho, wo, 3)
    torch.testing.assert_close(got, want)
    # a product of low cosines (k < h', l < w') is resampled exactly
    img = cosine(2, h)[:, None] * cosine(3, w)[None, :]
    out = dct_resample(dct_resample(img[None, :, :, None], ho, dim=1), wo, dim=2)[0, :, :, 0]
    torch.testing.assert_close(out, cosine(2, ho)[:, None] * cosine(3, wo)[None, :])


def test_overlap_matrix_is_an_area_partition():
    w = overlap_matrix(7, 3, torch.device("cpu"), F64)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(1), torch.full((3,), 7 / 3, dtype=F64))
    torch.testing.assert_close(w.sum(0), torch.ones(7, dtype=F64))
    # cell 0 of 3 is [0, 1/3): patches 0 and 1 whole, a third of patch 2
    torch.testing.assert_close(w[0], torch.tensor([1, 1, 1 / 3, 0, 0, 0, 0], dtype=F64))


def test_constants_are_built_once():
    dev = torch.device("cpu")
    a = dct_phase(50, 31, dev, torch.complex64)
    assert dct_phase(50, 31, dev, torch.complex64) is a
    assert dct_phase(50, 31, dev, torch.complex128) is not a
    assert overlap_matrix(50, 31, dev, torch.float32) is overlap_matrix(50, 31, dev, torch.float32)
    assert ("phase", 50, 31, dev, torch.complex64, True) in _CONSTANTS
    plan = dct_plan((14, 14), 12, None, 0.5, -0.5, "1d")
    assert dct_plan((14, 14), 12, None, 0.5, -0.5, "1d") is plan


# -- the schedule --------------------------------------------------------------------------------


def test_the_reference_schedule_for_deit():
    """OpenToMe's DeiT evaluation: merge_num 98, inflection -0.5. Its r=9 schedule
    13,12,11,10,10,9,8,7,7,6,5,5 totals 103 (r=8's totals 91), so the first block gives back 5."""
    assert merge_schedule(98, 12, -0.5) == [8, 12, 11, 10, 10, 9, 8, 7, 7, 6, 5, 5]
    assert merge_schedule(96, 12, 0.0) == [8] * 12
    assert merge_schedule(100, 12, 0.0) == [8] * 11 + [12]  # r=8 closest, the rest to the last block
    for total in (0, 1, 5, 98, 150, 192):
        assert sum(merge_schedule(total, 12, -0.5)) == total
    assert merge_schedule(30, 1, -0.5) == [30]
    reducer = DCT()
    counts = reducer.token_counts(1, 196, 12)
    assert [o for _, o in counts] == [189, 177, 166, 156, 146, 137, 129, 122, 115, 109, 104, 99]
    assert all(i == o_prev for (i, _), (_, o_prev) in zip(counts[1:], counts[:-1], strict=True))


def test_a_block_removes_at_most_half_its_tokens():
    reducer = DCT(keep_rate=0.02, blocks=[0, 1])
    counts = reducer.token_counts(1, 64, 6)
    assert [o for _, o in counts] == [33, 17, 17, 17, 17, 17]
    apply_reducer(tiny_vit(), reducer)
    assert reducer.notes() == ["keeps 16 of 64 patch tokens, not the 2 asked (a block removes at most half its tokens)"]
    assert DCT().notes() == []


def test_2d_grids_follow_the_1d_counts():
    plan = dct_plan((14, 14), 12, None, 0.5, -0.5, "2d")
    counts_1d = [o for _, (o, _) in dct_plan((14, 14), 12, None, 0.5, -0.5, "1d")]
    grids = [g for _, g in plan]
    for (h, w), (h2, w2) in zip(grids, grids[1:], strict=False):
        assert h2 <= h and w2 <= w
    # rounding to grids does not accumulate: every grid is within a grid step of the 1-D count
    for (h, w), target in zip(grids, counts_1d, strict=True):
        assert abs(h * w - target) <= max(h, w)


# -- the reducer in a model -----------------------------------------------------------------------

VARIANTS = {
    "plain": lambda: tiny_vit(),
    "registers": lambda: tiny_vit(reg_tokens=4, no_embed_class=True),
    "no_cls": lambda: tiny_vit(class_token=False, global_pool="avg"),
}


VARIANTS["distilled"] = tiny_distilled_vit


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kw", [{}, {"mode": "2d"}, {"blocks": [1, 3], "keep_rate": 0.4, "inflection": 0.0}])
def test_reducer_invariants(variant, kw, images):
    model = VARIANTS[variant]()
    reducer = build_reducer("dct", **kw)
    logits, steps, ctx = run_capturing(model, reducer, images)
    assert torch.isfinite(logits).all()
    p = model.num_prefix_tokens
    counts = reducer.token_counts(p, NUM_PATCHES, 6)
    assert ctx.token_trace == [o for _, o in counts]
    assert [b for b, _, _ in steps] == kw.get("blocks", list(range(6)))
    for _, before, after in steps:
        n_in, n_out = before.num_tokens - p, after.num_tokens - p
        assert after.x.shape[:2] == after.size.shape == after.pos.shape == after.source.shape[:2]
        # prefix tokens first and untouched, bit for bit
        assert torch.equal(after.x[:, :p], before.x[:, :p])
        assert torch.equal(after.size[:, :p], before.size[:, :p])
        assert torch.equal(after.pos[:, :p], before.pos[:, :p])
        assert torch.all(after.source[:, :p] == 0)
        if n_out == n_in:
            assert after is before
            continue
        # sizes: an equal share of the patches, summing to the patch count
        sizes = patch_sizes(after)
        torch.testing.assert_close(sizes, torch.full_like(sizes, NUM_PATCHES / n_out))
        # source map: non-negative, every patch covered with weight 1, rows sum to the sizes
        src = after.source[:, p:]
        assert (src >= 0).all()
        torch.testing.assert_close(src.sum(1), torch.ones(len(images), NUM_PATCHES))
        torch.testing.assert_close(src.sum(-1), sizes)
        assert (after.pos[:, p:] == -1).all()
        # the patch tokens are the DCT resampling of the incoming ones
        if kw.get("mode") == "2d":
            (h, w), (ho, wo) = before.grid, after.grid
            assert ho * wo == n_out and ho <= h and wo <= w
            grid = before.x[:, p:].reshape(len(images), h, w, -1)
            want = dct_resample(dct_resample(grid, ho, dim=1), wo, dim=2).reshape(len(images), n_out, -1)
        else:
            assert after.grid is None
            want = dct_resample(before.x[:, p:], n_out, dim=1)
        assert torch.equal(after.x[:, p:], want)
        # the mean patch token is kept (rows of M sum to 1 and columns to T'/T)
        torch.testing.assert_close(after.x[:, p:].mean(1), before.x[:, p:].mean(1), rtol=1e-4, atol=1e-5)
    # the spectral analysis paints every patch from the source map
    last = steps[-1][2]
    painted = scatter_to_grid(last.x, last.source, p, last.patch_grid)
    assert painted.shape == (len(images), last.x.shape[-1], 8, 8) and torch.isfinite(painted).all()
    assert ((last.source[:, p:] > 0).sum(1) >= 1).all()


def test_keep_everything_is_the_unreduced_model(images):
    model = tiny_vit()
    with torch.no_grad():
        want = model(images)
    apply_reducer(model, DCT(keep_rate=1.0))
    with torch.no_grad():
        got = model(images)
    assert torch.equal(got, want)
    assert reduction_context(model).token_trace == [65] * 6


def test_proportional_attention_is_off_by_default_and_can_be_turned_on(images):
    assert DCT().proportional_attention is False
    assert build_reducer("dct").proportional_attention is False
    model = tiny_vit()
    apply_reducer(model, DCT(prop_attn=True))
    ctx = reduction_context(model)
    with torch.no_grad():
        on = model(images)
    bias = ctx.attention_bias(5, torch.float32)
    assert bias is not None
    patches = bias[:, 0, 0, 1:]  # 32 patch tokens are left, each standing for 2 patches
    torch.testing.assert_close(patches, torch.full_like(patches, math.log(2)))
    apply_reducer(model, DCT())
    with torch.no_grad():
        off = model(images)
    assert reduction_context(model).attention_bias(5, torch.float32) is None
    assert not torch.allclose(on, off)


def test_bf16_autocast_and_training(images):
    model = tiny_vit()
    apply_reducer(model, DCT(mode="2d"))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(images).float()).all()
    model.train()
    model(images).logsumexp(-1).sum().backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0  # gradients pass through the FFTs


# -- budget, cost and capture --------------------------------------------------------------------


@pytest.fixture(scope="module")
def deit_tiny_random():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224").eval()


@pytest.mark.parametrize("mode", ["1d", "2d"])
@pytest.mark.parametrize("ratio", [0.80, 0.65, 0.50])
def test_budget_is_met_on_deit_tiny(deit_tiny_random, mode, ratio):
    shape, info = VitShape.of(deit_tiny_random), model_info(deit_tiny_random)
    sol = match_budget(build_reducer("dct", mode=mode), ratio, shape, info, tolerance=0.02, method="dct")
    assert sol.ratio == pytest.approx(ratio, rel=0.02)
    assert sol.knob == "keep_rate" and 0.02 <= sol.value <= 1.0
    assert analytic_macs(shape, sol.reducer, 196) == sol.macs


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit deprecation, inside fvcore
@pytest.mark.parametrize("mode", ["1d", "2d"])
def test_dense_products_are_counted_as_fvcore_counts_them(mode):
    """The dense route's matmuls are MACs the analytic count (and so every budget) includes:
    fvcore and the count agree on a model whose first 1-D blocks resample more than
    DENSE_MAX_TOKENS tokens (by FFT, 0 MACs in both) and whose later blocks fewer (dense); in
    2-D every axis (24 patches) is short, so every step is dense."""
    model = tiny_vit(img_size=96, depth=4)  # 24x24 = 576 patches
    reducer = DCT(keep_rate=0.3, mode=mode)
    apply_reducer(model, reducer)
    per_block = reducer.overhead_macs_per_block(1, 576, 4, 48, 3)
    counts = reducer.token_counts(1, 576, 4)
    assert counts[0][0] - 1 > DENSE_MAX_TOKENS and counts[-1][0] - 1 <= DENSE_MAX_TOKENS
    assert (per_block[0] == 0) == (mode == "1d") and all(m > 0 for m in per_block[1:])
    image = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    counted = fvcore_macs(model, image)
    analytic = analytic_macs(VitShape.of(model), reducer, 576)
    assert abs(counted / analytic - 1) < 0.01, (counted, analytic)
    dense = sum(per_block)  # fvcore saw (nearly) all of them: without them the counts differ
    assert counted - (analytic - dense) > 0.9 * dense, (counted, analytic, dense)
    none = tiny_vit(img_size=96, depth=4)
    apply_reducer(none, DCT(keep_rate=1.0, mode=mode))
    assert sum(none.token_reducer.overhead_macs_per_block(1, 576, 4, 48, 3)) == 0


def test_token_counts_match_a_deit_tiny_forward(deit_tiny_random):
    """The counts the MACs come from, against a real 224-px forward (both modes)."""
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    for mode in ("1d", "2d"):
        reducer = DCT(keep_rate=0.4, mode=mode)
        apply_reducer(deit_tiny_random, reducer)
        with torch.no_grad():
            deit_tiny_random(x)
        seen = reduction_context(deit_tiny_random).token_trace
        assert seen == [o for _, o in reducer.token_counts(1, 196, 12)]


@pytest.mark.parametrize("kw", [{}, {"mode": "2d", "prop_attn": True}])
def test_forward_is_one_graph(images, kw):
    """torch.compile(fullgraph=True) captures the reduced forward (no sync, no graph break),
    computes the eager logits, and reads the cached constants instead of rebuilding them."""
    model = tiny_vit()
    apply_reducer(model, build_reducer("dct", **kw), trace_source=bool(kw))
    graphs = []

    def backend(gm, example_inputs):  # dynamo's "eager" backend that also keeps the graph's code
        graphs.append(gm.code)
        return gm.forward

    with torch.no_grad():
        want = model(images)
        torch._dynamo.reset()
        got = torch.compile(model, fullgraph=True, backend=backend)(images)  # a graph break raises
    assert torch.equal(got, want)
    assert len(graphs) == 1
    assert "bmm" in graphs[0]
    assert "polar" not in graphs[0] and "cos" not in graphs[0], "the DCT constants were rebuilt in the graph"


def test_the_dense_route_stays_in_float32_under_autocast():
    """bf16 autocast (``bench.latency.amp``) would run a plain matmul in bf16; the dense route
    computes in float32 as the FFT route does, so both give what they give without autocast."""
    x = torch.randn(2, 196, 24, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        want = dct_resample(xd, 150)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = dct_resample(xd, 150)
            grid = dct_resample(xd.view(2, 14, 14, 24), 9, dim=1)
        assert got.dtype == dtype and torch.equal(got, want)
        assert torch.equal(grid, dct_resample(xd.view(2, 14, 14, 24), 9, dim=1))


def test_the_fft_route_is_one_graph_too():
    """A long sequence (a high-resolution model) compiles through the FFT route without
    rebuilding its phases in the graph."""
    x = torch.randn(1, DENSE_MAX_TOKENS + 4, 3, generator=torch.Generator().manual_seed(0))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    want = dct_resample(x, 400)
    torch._dynamo.reset()
    got = torch.compile(lambda t: dct_resample(t, 400), fullgraph=True, backend=backend)(x)
    assert torch.equal(got, want)
    assert len(graphs) == 1 and "fft_rfft" in graphs[0]
    assert "polar" not in graphs[0], "the DCT phases were rebuilt in the graph"


# -- bad knobs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"keep_rate": 0}, "keep_rate must be in"),
        ({"keep_rate": 1.5}, "keep_rate must be in"),
        ({"keep_rate": "half"}, "keep_rate must be in"),
        ({"inflection": 2}, "inflection"),
        ({"inflection": True}, "inflection"),
        ({"blocks": [3, 1]}, "strictly increasing"),
        ({"blocks": []}, "strictly increasing"),
        ({"blocks": [-1]}, "non-negative"),
        ({"blocks": "3"}, "list of block indices"),
        ({"mode": "3d"}, "mode must be one of"),
        ({"prop_attn": "yes"}, "prop_attn"),
        ({"rescale": 1}, "rescale"),
    ],
)
def test_bad_knobs_are_refused_at_construction(kw, match):
    with pytest.raises(ReducerConfigError, match=match):
        DCT(**kw)
    with pytest.raises(BenchError, match=match):
        build_reducer("dct", **kw)


def test_blocks_outside_the_model_are_refused_before_a_forward():
    with pytest.raises(ReducerConfigError, match="outside the model's depth"):
        apply_reducer(tiny_vit(), DCT(blocks=[2, 6]))
