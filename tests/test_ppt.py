"""PPT (methods/ppt.py): its equations on hand-made tokens, a slow per-image reference of the
reference's two branches, the per-image choice, the shared invariants on a tiny ViT, refused knobs.
Budgets and one compiled graph: the generic tests/test_budgets.py and tests/test_compile.py."""

from __future__ import annotations

import math
import statistics

import pytest
import timm
import torch
from conftest import build_reducer, tiny_distilled_vit, tiny_vit
from helpers import assert_step_invariants, hand_state, patch_sizes, run_capturing

from bench.errors import BenchError
from methods import ReducerConfigError, apply_reducer
from methods.base import TokenState
from methods.patch import model_info
from methods.ppt import (
    PPT,
    importance_scores,
    pool_matching,
    ppt_step,
    prune_lowest,
    score_variance,
    spread_r,
)
from methods.tokens import class_or_received_attention
from methods.tome import ToMe

NUM_PATCHES = 64  # tiny_vit: 8x8 grid
BLOCKS = [1, 3, 4]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _state(x, keys, values, cls_attn, num_prefix, size=None) -> TokenState:
    return hand_state(x, num_prefix, size, keys=keys, values=values, cls_attn=cls_attn)


def _random_state(b, n, prefix, seed, heads=2, d=3, c=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=g)
    keys = torch.randn(b, heads, n, d, generator=g)
    values = torch.randn(b, heads, n, d, generator=g)
    cls_attn = torch.randn(b, heads, n, generator=g).softmax(-1)
    size = torch.randint(1, 4, (b, n), generator=g).float()
    size[:, :prefix] = 1
    return _state(x, keys, values, cls_attn, prefix, size)


# -- slow references, one image at a time, with lists --------------------------------------------------
def _slow_scores(cls_attn, values, prefix):
    """s_i = (Σ_h a_h,i)·‖concat_h v_h,i‖ over the non-prefix tokens, normalised to sum 1."""
    heads, n = cls_attn.shape
    raw = []
    for i in range(prefix, n):
        a = sum(float(cls_attn[h, i]) for h in range(heads))
        norm = math.sqrt(sum(float(v) ** 2 for h in range(heads) for v in values[h, i]))
        raw.append(a * norm)
    return [s / sum(raw) for s in raw]


def _slow_prune(x, scores, r, prefix):
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[: len(scores) - r]
    return torch.stack([x[i] for i in range(prefix)] + [x[prefix + i] for i in order])


def _slow_pool(x, keys, size, r, prefix):
    """ToMe's bipartite soft matching as the reference calls it: A = even, B = odd tokens, the r A
    tokens most similar to their best B partner merge into it (size-weighted); output is
    ``[unmerged A in token order, B]`` (one prefix token: it is A's first)."""
    metric = keys.mean(0)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    n = metric.shape[0]
    a_idx, b_idx = list(range(0, n, 2)), list(range(1, n, 2))

    def sim(i, j):
        if i < prefix or j < prefix:
            return -math.inf
        return float(metric[i] @ metric[j])

    best = {i: max(b_idx, key=lambda j: (sim(i, j), -j)) for i in a_idx}
    edges = sorted(a_idx, key=lambda i: -sim(i, best[i]))
    src = set(edges[:r])
    rows = [x[i] for i in a_idx if i not in src]
    for j in b_idx:
        members = [j] + [i for i in src if best[i] == j]
        w = torch.stack([size[m] for m in members])
        rows.append((torch.stack([x[m] for m in members]) * w[:, None]).sum(0) / w.sum())
    return torch.stack(rows)


# -- the equations ------------------------------------------------------------------------------------
def test_importance_is_class_attention_summed_over_heads_times_value_norm():
    # heads pay [.1 .7 .1 .1] and [.1 .1 .1 .7]: summed, [.2 .8 .2 .8]
    cls_attn = torch.tensor([[[0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]]])
    # value of each token: head 0 gives (a, 0), head 1 gives (0, b): ‖v‖ = 1, 1, 2, 5
    v0 = torch.tensor([[1.0, 0], [0.6, 0], [0, 0], [3, 0]])
    v1 = torch.tensor([[0.0, 0], [0, 0.8], [0, 2], [0, 4]])
    values = torch.stack([v0, v1])[None]
    scores = importance_scores(cls_attn, values, num_prefix=1)
    assert torch.allclose(scores[0], torch.tensor([0.8, 0.4, 4.0]) / 5.2, atol=1e-7)  # [2, 1, 10] / 13
    assert torch.allclose(scores.sum(-1), torch.ones(1))
    # the variance is the unbiased one over the T scores
    want = statistics.variance([2 / 13, 1 / 13, 10 / 13])
    assert score_variance(scores)[0].item() == pytest.approx(want, rel=1e-6)
    # no prefix: every token is scored
    assert importance_scores(cls_attn, values, num_prefix=0).shape == (1, 4)


def test_without_a_class_token_the_received_attention_is_the_row():
    attn = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.25, 0.75], [0.2, 0.2, 0.6]])  # rows: queries
    st = _state(torch.zeros(1, 3, 2), None, None, None, 0).replace(attn=attn[None, None].expand(1, 2, 3, 3))
    row = class_or_received_attention(st)
    assert row.shape == (1, 2, 3)
    assert torch.allclose(row[0, 0], torch.tensor([0.7, 0.95, 1.35]) / 3)
    with_cls = st.replace(num_prefix=1, cls_attn=torch.ones(1, 2, 3))
    assert class_or_received_attention(with_cls) is with_cls.cls_attn


def test_importance_matches_the_slow_formula():
    st = _random_state(3, 9, 2, seed=4)
    got = importance_scores(st.cls_attn, st.values, 2)
    for b in range(3):
        assert torch.allclose(got[b], torch.tensor(_slow_scores(st.cls_attn[b], st.values[b], 2)), atol=1e-6)


def test_pruning_keeps_the_highest_scores_in_descending_order():
    x = torch.arange(4.0)[None, :, None].expand(1, 4, 2).clone()
    st = _state(x, torch.randn(1, 1, 4, 2), None, None, 1, size=torch.tensor([[1.0, 2, 3, 4]]))
    scores = torch.tensor([[2 / 13, 1 / 13, 10 / 13]])  # tokens 1, 2, 3
    out = prune_lowest(st, scores, 1)
    assert out.x[0, :, 0].tolist() == [0, 3, 1], "class token first, then token 3 (10/13), token 1 (2/13)"
    assert out.size[0].tolist() == [1, 4, 2]
    assert out.pos[0].tolist() == [-1, 2, 0]
    assert out.source[0].sum(0).tolist() == [2, 0, 4], "token 2's patch is gone"
    # ties stay in token order
    out = prune_lowest(st, torch.full((1, 3), 1 / 3), 1)
    assert out.x[0, :, 0].tolist() == [0, 1, 2]


@pytest.mark.parametrize("prefix", [1, 2])
def test_both_branches_match_the_slow_reference(prefix):
    n = prefix + 15
    st = _random_state(2, n, prefix, seed=7 + prefix)
    scores = importance_scores(st.cls_attn, st.values, prefix)
    for r in (1, 4, 7):
        pruned = prune_lowest(st, scores, r)
        pooled = pool_matching(st, r)
        assert pruned.x.shape == pooled.x.shape == (2, n - r, 5)
        for b in range(2):
            slow = _slow_scores(st.cls_attn[b], st.values[b], prefix)
            assert torch.equal(pruned.x[b], _slow_prune(st.x[b], slow, r, prefix))
            if prefix == 1:  # the reference's layout (one class token)
                assert torch.allclose(pooled.x[b], _slow_pool(st.x[b], st.keys[b], st.size[b], r, 1), atol=1e-5)
        assert torch.equal(pooled.x[:, :prefix], st.x[:, :prefix])
        assert torch.allclose(pooled.size.sum(-1), st.size.sum(-1)), "merging adds sizes up"


def test_each_image_takes_its_own_branch():
    """Flat scores pool, peaked scores prune, in the same batch; the threshold is strict (<)."""
    st = _random_state(2, 11, 1, seed=3)
    flat_values = st.values.clone()
    flat_values[0] = 1.0  # image 0: equal ‖v‖ and uniform class attention -> variance 0
    cls_attn = st.cls_attn.clone()
    cls_attn[0] = 1 / 11
    cls_attn[1, :, 1:] = torch.linspace(0.01, 1, 10)  # image 1: peaked
    st = st.replace(values=flat_values, cls_attn=cls_attn)
    var = score_variance(importance_scores(st.cls_attn, st.values, 1))
    assert var[0] < 1e-12 < var[1]
    scores = importance_scores(st.cls_attn, st.values, 1)
    pooled, pruned = pool_matching(st, 3), prune_lowest(st, scores, 3)
    for threshold, branch in ((var[1].item(), ("pool", "prune")), (math.inf, ("pool", "pool")), (0.0, ("prune",) * 2)):
        out = ppt_step(st, 3, threshold)
        assert out.num_tokens == 11 - 3
        for b, name in enumerate(branch):
            want = pooled if name == "pool" else pruned
            for field in ("x", "size", "pos", "source"):
                assert torch.equal(getattr(out, field)[b], getattr(want, field)[b]), (threshold, b, field)


def test_r_is_capped_at_half_and_spread():
    st = _random_state(1, 7, 1, seed=0)
    assert ppt_step(st, 50, 1.0).num_tokens == 7 - 3  # (7 - 1) // 2
    assert ppt_step(st, 0, 1.0) is st
    assert spread_r(50, 3) == [50, 50, 50]
    assert spread_r(47.75, 3) == [48, 48, 47] and sum(spread_r(47.75, 4)) == 191
    assert spread_r([3, 0, 9], 3) == [3, 0, 9]
    reducer = PPT(r=50)
    assert reducer.token_counts(1, 196, 12)[9] == (97, 49), "block 9 removes 48: the reference's cap"
    with torch.device("meta"):
        deit = timm.create_model("deit_tiny_patch16_224")
    reducer.bind(model_info(deit))
    assert reducer.notes() and "block 9 removes 48 of the 50" in reducer.notes()[0]
    uncapped = PPT(r=40)
    uncapped.bind(model_info(deit))
    assert uncapped.notes() == []


# -- the shared invariants on a tiny ViT --------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        {"blocks": BLOCKS},
        {"blocks": BLOCKS, "threshold": 0.0, "r": 9},
        {"blocks": [0, 2, 5], "threshold": math.inf, "r": [20, 5, 3], "prop_attn": False},
    ],
)
def test_runs_with_valid_steps(kw, images):
    model = tiny_vit()
    reducer = build_reducer("ppt", **kw)
    logits, steps, ctx = run_capturing(model, reducer, images)
    assert torch.isfinite(logits).all()
    assert ctx.token_trace == [out for _, out in reducer.token_counts(1, NUM_PATCHES, 6)]
    assert [b for b, _, _ in steps] == kw["blocks"]
    assert reducer.proportional_attention is kw.get("prop_attn", True)
    for _, before, after in steps:
        assert_step_invariants(before, after, partition=False)
        # every image either kept all its patches (pooled) or lost whole tokens (pruned)
        lost = patch_sizes(before).sum(-1) - patch_sizes(after).sum(-1)
        if kw.get("threshold") == math.inf:
            assert torch.all(lost == 0)
        if kw.get("threshold") == 0.0:
            assert torch.all(lost > 0)


def test_every_step_follows_its_images_branch(images):
    """A threshold between the images' variances: some images pool, some prune, and each step of a
    real forward is, per image, exactly the branch its own variance picks."""
    model = tiny_vit()
    _, steps, _ = run_capturing(model, build_reducer("ppt", blocks=BLOCKS, threshold=0.0, r=8), images)
    first = steps[0][1]
    var = score_variance(importance_scores(first.cls_attn, first.values, 1))
    threshold = var.median().item()
    _, steps, _ = run_capturing(model, build_reducer("ppt", blocks=BLOCKS, threshold=threshold, r=8), images)
    picked = set()
    for _, before, after in steps:
        scores = importance_scores(before.cls_attn, before.values, 1)
        pool = score_variance(scores) < threshold
        pooled, pruned = pool_matching(before, 8), prune_lowest(before, scores, 8)
        for b in range(len(images)):
            want = pooled if pool[b] else pruned
            assert torch.equal(after.x[b], want.x[b]) and torch.equal(after.size[b], want.size[b])
            picked.add(bool(pool[b]))
    assert picked == {True, False}


def test_always_pooling_is_tome_at_the_same_blocks(images):
    model = tiny_vit()
    r = [0, 7, 0, 5, 4, 0]
    ppt_logits, _, _ = run_capturing(
        model, build_reducer("ppt", blocks=BLOCKS, r=[7, 5, 4], threshold=math.inf), images
    )
    tome_logits, _, _ = run_capturing(model, ToMe(r=r, prop_attn=True), images)
    assert torch.allclose(ppt_logits, tome_logits, atol=1e-5)


def test_layouts_with_more_or_no_prefix_tokens():
    distilled = tiny_distilled_vit()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for model, prefix in (
        (distilled, 2),
        (tiny_vit(reg_tokens=4), 5),
        (tiny_vit(class_token=False, global_pool="avg"), 0),
    ):
        reducer = build_reducer("ppt", blocks=BLOCKS, r=12)
        logits, steps, ctx = run_capturing(model, reducer, images)
        assert torch.isfinite(logits).all()
        assert ctx.token_trace == [out for _, out in reducer.token_counts(prefix, NUM_PATCHES, 6)]
        for _, before, after in steps:
            assert torch.equal(after.x[:, :prefix], before.x[:, :prefix])
            if prefix == 0:  # no class token: the full map is tapped for the received attention
                assert before.attn is not None and before.cls_attn is None


def test_bad_knobs_are_refused():
    for bad in (-1, math.inf, True, "50", [5, 5], [5, -1, 5], [5, 1.5, 5]):
        with pytest.raises(BenchError, match=" r"):
            build_reducer("ppt", r=bad)
    for bad in (-1e-5, math.nan, None, "7e-5", False):
        with pytest.raises(BenchError, match="threshold"):
            build_reducer("ppt", threshold=bad)
    for bad in ([6, 3], [3, 3], [-1], ["a"], "3"):
        with pytest.raises(BenchError, match="block"):
            build_reducer("ppt", blocks=bad)
    with pytest.raises(BenchError, match="prop_attn"):
        build_reducer("ppt", prop_attn="yes")
    with pytest.raises(ReducerConfigError, match="outside the model's depth"):
        apply_reducer(tiny_vit(), PPT(blocks=[3, 6, 9]))
