"""Zero-TPrune (methods/zerotprune.py): WPR, the head filter and EIR, the S-stage and the
I-stage on hand-made tensors, a slow per-image reference, the shared invariants on a tiny ViT.
Budgets and one compiled graph: the generic tests/test_budgets.py and tests/test_compile.py."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_reducer, tiny_vit
from helpers import hand_state, run_capturing

from bench.errors import BenchError
from methods import ReducerConfigError, apply_reducer
from methods.base import TokenState
from methods.patch import model_info
from methods.zerotprune import (
    ZeroTPrune,
    aggregate_heads,
    head_variance,
    initial_scores,
    kept_page_rank,
    prune_schedule,
    similarity_prune,
    split_counts,
    weighted_page_rank,
    wpr_schedule,
    zerotprune_step,
)

NUM_PATCHES = 64  # tiny_vit: 8x8 grid

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _state(x: torch.Tensor, attn: torch.Tensor, keys: torch.Tensor | None, num_prefix: int) -> TokenState:
    return hand_state(x, num_prefix, attn=attn, keys=keys)


# -- the equations ------------------------------------------------------------------------------------
def test_wpr_is_a_vote_weighted_by_the_voters_score():
    """``s ← Aᵀ s``: one step from uniform gives the mean attention each token receives; many
    steps reach the stationary distribution of the attention graph."""
    attn = torch.tensor([[0.9, 0.1], [0.5, 0.5]])[None, None]  # rows: what each query gives
    init = torch.full((1, 1, 2), 0.5)
    assert torch.allclose(weighted_page_rank(attn, init, 1)[0, 0], torch.tensor([0.7, 0.3]))
    assert torch.allclose(weighted_page_rank(attn, init, 200)[0, 0], torch.tensor([5 / 6, 1 / 6]), atol=1e-6)
    # a column-stochastic Aᵀ keeps the total: no renormalisation needed
    attn3 = torch.softmax(torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(0)), -1)
    s = weighted_page_rank(attn3, initial_scores(attn3, 1, True), 30)
    assert torch.allclose(s.sum(-1), torch.ones(2, 3), atol=1e-5)


def test_wpr_on_flattened_heads_is_the_four_d_matmul_bit_for_bit():
    """Each step is one ``bmm`` over batch × heads: the product ``matmul`` would compute on the
    4-D operands, so the scores (and every ranking made from them) are the same bits."""
    g = torch.Generator().manual_seed(3)
    for b, h, n in ((1, 3, 197), (4, 3, 37), (2, 12, 9)):
        attn = torch.softmax(3 * torch.randn(b, h, n, n, generator=g), dim=-1)
        init = initial_scores(attn, 1, True)
        s = init.unsqueeze(-2)
        for _ in range(30):
            s = s @ attn
        assert torch.equal(weighted_page_rank(attn, init, 30), s.squeeze(-2))


def test_initial_scores_boost_the_prefix_by_sqrt_n():
    attn = torch.zeros(1, 2, 4, 4)
    assert torch.allclose(initial_scores(attn, 1, True)[0, 1], torch.tensor([2.0, 1, 1, 1]) / 5)
    assert torch.allclose(initial_scores(attn, 2, True)[0, 0], torch.tensor([2.0, 2, 1, 1]) / 6)
    assert torch.allclose(initial_scores(attn, 1, False)[0, 0], torch.full((4,), 0.25))
    assert torch.allclose(initial_scores(attn, 0, True)[0, 0], torch.full((4,), 0.25))


def test_head_variance_is_scale_free():
    scores = torch.tensor([[[1.0, 1, 1, 1], [1.0, 3, 1, 3], [4.0, 0, 0, 0]]])
    assert torch.allclose(head_variance(scores)[0], torch.tensor([0.0, 0.25, 3.0]))
    assert torch.allclose(head_variance(7 * scores), head_variance(scores))


def test_vhf_drops_uniform_and_collapsed_heads_and_eir_is_a_root_mean_square():
    # one prefix token (left out of the variance), three patch tokens per head
    uniform = [0.4, 0.2, 0.2, 0.2]  # patch variance 0: filtered
    moderate = [0.1, 0.2, 0.3, 0.4]  # patch scores / mean = [2/3, 1, 4/3]: variance 2/27, kept
    collapsed = [0.1, 0.9, 0.0, 0.0]  # [3, 0, 0]: variance 2, filtered
    moderate2 = [0.3, 0.3, 0.2, 0.2]  # [9/7, 6/7, 6/7]: variance 2/49, kept
    scores = torch.tensor([[uniform, moderate, collapsed, moderate2]])
    got = aggregate_heads(scores, 1, (0.01, 0.7))[0]
    want = ((torch.tensor(moderate) ** 2 + torch.tensor(moderate2) ** 2) / 2).sqrt()
    assert torch.allclose(got, want)
    # a token very important in one head outranks one lukewarm in every head (EIR, not a mean)
    peaked = torch.tensor([[[0.0, 0.8, 0.45, 0.0], [0.0, 0.0, 0.45, 0.1]]])
    eir = aggregate_heads(peaked, 1, None)[0]
    assert eir[1] > eir[2] and peaked.mean(1)[0, 1] < peaked.mean(1)[0, 2]
    # an image whose heads are all filtered aggregates all of them
    none_kept = torch.tensor([[uniform, collapsed]])
    assert torch.allclose(aggregate_heads(none_kept, 1, (0.01, 0.7)), aggregate_heads(none_kept, 1, None))


@pytest.mark.parametrize("fill", [None, float("nan"), 2.0])  # mixed; no head inside (NaN, above the range)
def test_the_head_filter_keeps_exactly_the_heads_of_its_range(fill, monkeypatch):
    """The filter's mask, written with fewer operators, is ``lo <= var <= hi`` (every head where
    none is inside) bit for bit: at the bounds, beyond them, for NaN and infinite variances."""
    import methods.zerotprune as zerotprune

    lo, hi = 0.01, 0.7
    var = torch.tensor([[lo, hi, 0.5, 0.0099, 0.7001, float("nan"), float("inf"), -float("inf")]])
    if fill is not None:
        var = torch.full_like(var, fill)
    monkeypatch.setattr(zerotprune, "head_variance", lambda patch_scores: var)  # the filter's input, chosen
    scores = torch.rand(1, var.shape[1], 6) + 0.1
    plain = (var >= lo) & (var <= hi)
    keep = torch.where(plain.sum(-1, keepdim=True) > 0, plain.float(), 1.0)
    want = ((scores.square() * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)).sqrt()
    assert torch.equal(aggregate_heads(scores, 1, (lo, hi)), want)


@pytest.mark.parametrize(("prefix", "cls_boost"), [(1, True), (2, True), (1, False), (0, True)])
def test_kept_page_rank_is_page_rank_on_the_softmax_over_the_kept_keys(prefix, cls_boost):
    """The I-stage's graph is the attention among the tokens the S-stage kept, each row
    renormalised: the softmax over those keys alone. ``kept_page_rank`` never builds it; at the
    kept positions its scores are PageRank on that graph, from that graph's own initial scores."""
    g = torch.Generator().manual_seed(1 + prefix)
    logits = torch.randn(2, 3, 9, 9, generator=g)
    dropped = torch.tensor([[4, 5, 6], [3, 7, 2]])
    idx = torch.stack([torch.tensor([i for i in range(9) if i not in row]) for row in dropped.tolist()])
    sub = torch.stack([torch.softmax(logits[b][:, idx[b]][:, :, idx[b]], dim=-1) for b in range(2)])
    for iters in (1, 5, 30):
        want = weighted_page_rank(sub, initial_scores(sub, prefix, cls_boost), iters)
        got = kept_page_rank(torch.softmax(logits, -1), dropped, prefix, iters, cls_boost)
        assert torch.allclose(got.gather(2, idx[:, None, :].expand(2, 3, -1)), want, rtol=1e-5, atol=1e-7)


def test_kept_page_rank_stays_finite_when_kept_rows_attend_only_to_dropped_keys():
    """Rows whose whole attention went to dropped keys have no mass on the kept ones: the
    sub-matrix has a zero row there (it votes for nobody), and the huge ``1 / mass`` weight
    must not overflow what the dropped positions receive (``inf · 0`` would be NaN next step)."""
    n, dropped = 8, torch.tensor([[5, 6, 7]])
    attn = torch.softmax(torch.randn(1, 2, n, n, generator=torch.Generator().manual_seed(3)), dim=-1)
    attn[:, :, 1:5] = 0.0
    attn[:, :, 1:5, 5:] = 1 / 3  # four of the five kept tokens attend only to dropped keys
    idx = torch.tensor([[0, 1, 2, 3, 4]])
    sub = attn[:, :, idx[0]][:, :, :, idx[0]]
    sub = sub / sub.sum(-1, keepdim=True).clamp_min(torch.finfo(sub.dtype).tiny)
    for iters in (1, 5, 30):
        got = kept_page_rank(attn, dropped, 1, iters, True)
        assert torch.isfinite(got).all()
        want = weighted_page_rank(sub, initial_scores(sub, 1, True), iters)
        assert torch.allclose(got[..., :5], want, rtol=1e-5, atol=1e-7)


def test_s_stage_drops_the_unimportant_copies_of_other_tokens():
    """Six patch tokens, the three least important form set A; A's token 4 is an exact copy of
    B's token 1, A's tokens 0 and 5 copy each other (both in A: not a match). r=1 drops 4."""
    e = torch.eye(6)
    keys = torch.stack([e[0], e[1], e[2], e[3], e[1], e[0] + 0.01 * e[5]])[None]
    importance = torch.tensor([[0.1, 0.9, 0.8, 0.7, 0.2, 0.3]])  # A = {0, 4, 5}, B = {3, 2, 1}
    kept, dropped = similarity_prune(importance, keys, 1)
    assert kept.tolist() == [[0, 1, 2, 3, 5]] and dropped.tolist() == [[4]]
    kept, dropped = similarity_prune(importance, keys, 0)
    assert kept.tolist() == [[0, 1, 2, 3, 4, 5]] and dropped.shape == (1, 0)
    # r = |A|: the whole unimportant half goes, most similar first does not matter any more
    kept, dropped = similarity_prune(importance, keys, 3)
    assert kept.tolist() == [[1, 2, 3]] and sorted(dropped[0].tolist()) == [0, 4, 5]


def test_i_stage_drops_the_tokens_nobody_attends_to():
    """Every token gives its attention to the class token and patches 1-2: patches 3 and 4
    receive nothing, score 0, and are the two the I-stage drops."""
    row = torch.tensor([0.4, 0.3, 0.3, 0.0, 0.0])
    attn = row.expand(1, 2, 5, 5).clone()
    x = torch.randn(1, 5, 4, generator=torch.Generator().manual_seed(0))
    out = zerotprune_step(_state(x, attn, None, 1), r_s=0, r_i=2, iters=3)
    assert torch.equal(out.x, x[:, :3]) and out.pos.tolist() == [[-1, 0, 1]]
    assert out.size.tolist() == [[1.0, 1.0, 1.0]] and out.reduced


# -- a slow per-image reference -------------------------------------------------------------------------
def _slow_importance(attn, prefix, iters, var_range, cls_boost):
    """One image: attn (H, N, N) as nested lists -> list of N scores (WPR, VHF, EIR)."""
    h, n = len(attn), len(attn[0])
    base = [math.sqrt(n) if (cls_boost and i < prefix) else 1.0 for i in range(n)]
    per_head = []
    for a in attn:
        s = [v / sum(base) for v in base]
        for _ in range(iters):
            s = [sum(a[j][i] * s[j] for j in range(n)) for i in range(n)]
        per_head.append(s)
    keep = []
    for s in per_head:
        patch = s[prefix:]
        mean = sum(patch) / len(patch)
        var = sum((v / mean - 1) ** 2 for v in patch) / len(patch)
        keep.append(var_range is None or var_range[0] <= var <= var_range[1])
    if not any(keep):
        keep = [True] * h
    return [math.sqrt(sum(s[i] ** 2 for s, k in zip(per_head, keep, strict=True) if k) / sum(keep)) for i in range(n)]


def _slow_step(x, attn, keys, prefix, r_s, r_i, iters, var_range, cls_boost):
    outs = []
    for b in range(x.shape[0]):
        a = attn[b].double().tolist()
        n = len(a[0])
        kept = list(range(prefix, n))  # token indices
        if r_s:
            pre = _slow_importance(a, prefix, 1, var_range, cls_boost)
            order = sorted(kept, key=lambda i, pre=pre: pre[i])  # stable: ties in token order
            half = len(order) // 2
            set_a, set_b = order[:half], order[half:]
            unit = torch.nn.functional.normalize(keys[b].double(), dim=-1)
            best = {i: max(float(unit[i] @ unit[j]) for j in set_b) for i in set_a}
            dropped = set(sorted(set_a, key=lambda i, best=best: -best[i])[:r_s])
            kept = [i for i in kept if i not in dropped]
        if r_i:
            idx = list(range(prefix)) + kept
            sub = [[[head[i][j] for j in idx] for i in idx] for head in a]
            sub = [[[v / sum(row) for v in row] for row in head] for head in sub]
            score = _slow_importance(sub, prefix, iters, var_range, cls_boost)[prefix:]
            ranked = sorted(range(len(kept)), key=lambda k, score=score: -score[k])[: len(kept) - r_i]
            kept = [kept[k] for k in sorted(ranked)]
        outs.append(x[b, list(range(prefix)) + kept])
    return torch.stack(outs)


@pytest.mark.parametrize("prefix", [0, 1, 2])
@pytest.mark.parametrize(("r_s", "r_i"), [(0, 3), (4, 0), (2, 5), (6, 1)])
def test_matches_slow_reference(prefix, r_s, r_i):
    g = torch.Generator().manual_seed(10 * prefix + r_s)
    n, heads = prefix + 13, 3
    # sharp attention so that some heads pass the variance filter and some do not
    attn = torch.softmax(3 * torch.randn(2, heads, n, n, generator=g), dim=-1)
    keys = torch.randn(2, heads, n, 4, generator=g)
    x = torch.randn(2, n, 5, generator=g)
    for var_range, cls_boost in (((0.01, 0.7), True), (None, False)):
        out = zerotprune_step(_state(x, attn, keys, prefix), r_s, r_i, 4, var_range, cls_boost)
        ref = _slow_step(x, attn, keys.transpose(1, 2).reshape(2, n, -1), prefix, r_s, r_i, 4, var_range, cls_boost)
        assert out.x.shape == ref.shape == (2, n - r_s - r_i, 5)
        assert torch.equal(out.x, ref)


# -- schedule ---------------------------------------------------------------------------------------------
def test_schedule_split_and_iterations():
    assert prune_schedule(2.5, 4) == [2, 3, 3, 2] and sum(prune_schedule(11.3, 12)) == round(11.3 * 12)
    assert prune_schedule([4, 0, 2], 5) == [4, 0, 2, 0, 0]
    assert split_counts(11, 196, 0.5) == (6, 5)
    assert split_counts(11, 5, 0.5) == (2, 2)  # capped: one patch token stays, r_s at |A| = 2
    assert split_counts(3, 1, 0.5) == (0, 0)
    assert split_counts(9, 20, 1.0) == (9, 0) and split_counts(15, 20, 1.0) == (10, 5)
    assert split_counts(9, 20, 0.0) == (0, 9)
    assert wpr_schedule([30, 5, 1], 12) == [30] * 3 + [5] * 6 + [1] * 3
    assert wpr_schedule([30, 5, 1], 4) == [30, 30, 30, 1]


# -- the shared invariants on a tiny ViT --------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"r": 4.5, "s_share": 0.0}, {"r": [9, 0, 7], "s_share": 1.0, "var_range": None}])
def test_runs_with_valid_steps(kw, images):
    model = tiny_vit()
    reducer = build_reducer("zerotprune", **kw)
    logits, steps, ctx = run_capturing(model, reducer, images)
    assert torch.isfinite(logits).all()
    assert ctx.token_trace == [out for _, out in reducer.token_counts(1, NUM_PATCHES, 6)]
    assert [b for b, _, _ in steps] == [b for b in range(6) if reducer.schedule[b] > 0]
    assert reducer.proportional_attention is False
    for _, before, after in steps:
        assert torch.equal(after.x[:, :1], before.x[:, :1])
        assert torch.all(after.size == 1) and not after.may_have_empty
        # every kept token is an exact copy of one token before the step, in token order
        src, prev = after.source[:, 1:], before.source[:, 1:]
        which = (src @ prev.transpose(1, 2)).argmax(-1)
        assert torch.all(which[:, 1:] > which[:, :-1])
        assert torch.equal(after.x[:, 1:], torch.stack([before.x[b, 1:][which[b]] for b in range(len(which))]))


def test_a_model_without_class_token_is_noted():
    for model, uniform in ((tiny_vit(), False), (tiny_vit(class_token=False, global_pool="avg"), True)):
        reducer = build_reducer("zerotprune", r=6)
        reducer.bind(model_info(model))
        assert any("Zero-TPrune-uni" in note for note in reducer.notes()) is uniform


def test_r_zero_changes_nothing(images):
    model = tiny_vit()
    with torch.no_grad():
        ref = model(images)
    logits, steps, ctx = run_capturing(model, build_reducer("zerotprune", r=0), images)
    assert ctx.token_trace == [65] * 6 and steps == []
    assert (logits - ref).abs().max() < 1e-5


def test_caps_are_noted():
    reducer = build_reducer("zerotprune", r=[60, 10])
    apply_reducer(tiny_vit(), reducer)
    assert reducer.token_counts(1, NUM_PATCHES, 6)[:2] == [(65, 5), (5, 2)]
    assert reducer.notes() == ["Zero-TPrune keeps one patch token: r capped in blocks 1 (10 -> 3)"]


def test_iterations_by_depth_on_twelve_blocks():
    reducer = build_reducer("zerotprune")
    reducer.bind(model_info(tiny_vit(depth=12)))
    assert reducer.iters == [30] * 3 + [5] * 6 + [1] * 3


def test_bad_knobs_are_refused():
    for bad in (-1, True, "11", [3, -1], [2.5], None):
        with pytest.raises(BenchError, match="Zero-TPrune r"):
            build_reducer("zerotprune", r=bad)
    for bad in (-0.1, 1.5, "half"):
        with pytest.raises(BenchError, match="s_share"):
            build_reducer("zerotprune", s_share=bad)
    for bad in ([30, 5], [30, 0, 1], [30, 5, 1.5], 30):
        with pytest.raises(BenchError, match="wpr_iters"):
            build_reducer("zerotprune", wpr_iters=bad)
    for bad in ([0.7, 0.01], [-0.1, 0.7], [0.01], "0.01"):
        with pytest.raises(BenchError, match="var_range"):
            build_reducer("zerotprune", var_range=bad)
    with pytest.raises(BenchError, match="cls_boost"):
        build_reducer("zerotprune", cls_boost="yes")
    with pytest.raises(BenchError, match="prop_attn"):
        build_reducer("zerotprune", prop_attn=1)
    with pytest.raises(ReducerConfigError, match="r lists 7 blocks but the model has 6"):
        apply_reducer(tiny_vit(), ZeroTPrune(r=[1] * 7))
