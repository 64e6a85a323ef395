"""ATS (methods/ats.py): its equations on hand-made scores, a slow per-image reference of the
sampling, the shared invariants on a tiny ViT (per-image counts in static slots), bad
knobs refused before any forward. Budgets: the generic tests/test_budgets.py."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import build_reducer, tiny_distilled_vit, tiny_vit
from helpers import hand_state, run_capturing

from bench.errors import BenchError
from bench.measure.flops import VitShape
from methods import ATTN, CLS_ATTN, VALUES, ReducerConfigError, apply_reducer
from methods.ats import (
    ATS,
    ats_select,
    ats_step,
    distinct_slots,
    filled_counts,
    inverse_transform_sample,
    num_samples,
    rescaled_cdf,
    sample_points,
    significance_scores,
)
from methods.base import ModelInfo, TokenState
from methods.patch import model_info

NUM_PATCHES = 64  # tiny_vit: 8x8 grid
BLOCKS = [1, 3, 4]  # the reference's 3..11 scaled into the tiny ViT's 6 blocks

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- the equations ------------------------------------------------------------------------------------
def test_significance_is_class_attention_summed_over_heads_times_the_value_norm():
    # 2 heads, 1 prefix + 3 tokens; per-head values chosen so ‖concat_h v‖ is 5, 1, 2 (prefix: 7)
    attn = torch.tensor([[[0.4, 0.1, 0.2, 0.3], [0.1, 0.5, 0.1, 0.3]]])  # (B, H, N)
    values = torch.zeros(1, 2, 4, 2)
    values[0, 0, :, 0] = torch.tensor([7.0, 3.0, 1.0, 0.0])
    values[0, 1, :, 1] = torch.tensor([0.0, 4.0, 0.0, 2.0])
    raw = torch.tensor([(0.1 + 0.5) * 5, (0.2 + 0.1) * 1, (0.3 + 0.3) * 2])
    s = significance_scores(attn, values, num_prefix=1)
    assert torch.allclose(s[0], raw / raw.sum())
    # an empty slot scores 0 whatever its attention
    s = significance_scores(attn, values, 1, filled=torch.tensor([[True, True, False, True]]))
    want = raw * torch.tensor([1.0, 0.0, 1.0])
    assert torch.allclose(s[0], want / want.sum())
    assert s[0, 1] == 0


def test_cdf_is_rescaled_and_the_points_run_from_its_first_positive_value_to_one():
    cdf = rescaled_cdf(torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64))
    assert torch.allclose(cdf[0], torch.tensor([0, 0.2 / 0.9, 0.5 / 0.9, 1], dtype=torch.float64))
    ys = sample_points(cdf, 4)
    y0 = 0.2 / 0.9
    assert torch.allclose(ys[0], torch.tensor([y0 + i * (1 - y0) / 3 for i in range(4)], dtype=torch.float64))
    # leading zeros (empty slots) are skipped: the grid starts at the first positive value
    cdf = rescaled_cdf(torch.tensor([[0.0, 0.0, 0.5, 0.5]]))
    assert cdf[0].tolist() == [0, 0, 0.5, 1] and sample_points(cdf, 3)[0].tolist() == [0.5, 0.75, 1.0]


def test_a_peaked_distribution_is_sampled_several_times_and_the_lowest_token_never():
    scores = torch.tensor([[0.97, 0.01, 0.01, 0.01]], dtype=torch.float64)
    picked, order = inverse_transform_sample(scores, 4)
    # ascending (stable): tokens 1, 2, 3, 0; ĉ = [0, .0103, .0206, 1]; y = .0103, .340, .670, 1
    assert order[0].tolist() == [1, 2, 3, 0]
    assert picked[0].tolist() == [1, 2, 3, 3]
    chosen = ats_select(scores, 4, 4)
    assert chosen[0].tolist() == [2, 3, 0, -1], "distinct tokens in ascending score, then an empty slot"


def test_distinct_slots_turn_repeats_into_empty_slots_after_the_kept_ones():
    picked = torch.tensor([[3, 1, 3, 0], [2, 2, 2, 2]])
    assert distinct_slots(picked, 4, 4).tolist() == [[0, 1, 3, 4], [2, 4, 4, 4]]
    assert distinct_slots(picked, 4, 2).tolist() == [[0, 1], [2, 4]]
    assert distinct_slots(torch.tensor([[1, 0]]), 4, 3).tolist() == [[0, 1, 4]]


def _slow_ats(scores: list[float], k: int, slots: int) -> list[int]:
    """One image, from the reference's recipe, in Python doubles and lists."""
    t = len(scores)
    order = sorted(range(t), key=lambda j: (scores[j], j))
    cdf = list(torch.tensor([scores[j] for j in order], dtype=torch.float64).cumsum(0).tolist())
    lo, hi = min(cdf), max(cdf)
    c = [(v - lo) / (hi - lo) for v in cdf]
    y0 = min([v for v in c if v > 0], default=1e8)
    ys = [y0 + i * (1 - y0) / max(k - 1, 1) for i in range(k)]
    picks = {min(range(t), key=lambda j, y=y: (abs(y - c[j]), j)) for y in ys}
    kept = [order[p] for p in sorted(picks)]
    return (kept + [-1] * slots)[:slots]


@pytest.mark.parametrize("empties", [0, 5])
@pytest.mark.parametrize("k", [4, 11, 19, 30])
def test_sampling_matches_a_slow_reference(k, empties):
    g = torch.Generator().manual_seed(k + empties)
    t = 19
    raw = torch.rand(3, t, generator=g, dtype=torch.float64) ** 4  # peaked: repeats happen
    raw[:, :empties] = 0  # empty slots score 0 and are never picked
    scores = raw / raw.sum(-1, keepdim=True)
    slots = min(k, t)
    chosen = ats_select(scores, k, slots)
    assert chosen.shape == (3, slots)
    for b in range(3):
        want = _slow_ats(scores[b].tolist(), k, slots)
        assert chosen[b].tolist() == want
        assert not set(want) & set(range(empties))


def _state(x: torch.Tensor, attn_row: torch.Tensor, num_prefix: int) -> TokenState:
    values = torch.ones(x.shape[0], 1, x.shape[1], 1)  # ‖v‖ = 1: the score is the attention
    return hand_state(x, num_prefix, cls_attn=attn_row[:, None], values=values).replace(
        grid=(1, x.shape[1] - num_prefix)
    )


def test_a_step_gathers_kept_tokens_exactly_and_leaves_empty_slots():
    x = torch.randn(1, 6, 3, generator=torch.Generator().manual_seed(0))
    attn = torch.tensor([[0.5, 0.485, 0.005, 0.005, 0.005, 0.0]])  # prefix, then scores .97 .01 .01 .01 0
    out = ats_step(_state(x, attn, 1), k=4)
    # the 5 tokens in ascending score: 4, 1, 2, 3, 0 with ĉ = 0, .01, .02, .03, 1; the points
    # y = .01, .34, .67, 1 pick token 1, token 3 (nearest to .34), token 0 twice; token 2 falls between
    assert out.num_tokens == 1 + 4 and out.may_have_empty and out.reduced
    assert out.pos[0].tolist() == [-1, 1, 3, 0, -1]
    assert torch.equal(out.x[0, 0], x[0, 0])
    filled = out.size[0] > 0
    assert filled.tolist() == [True, True, True, True, False]
    for slot in range(1, 4):
        assert torch.equal(out.x[0, slot], x[0, 1 + int(out.pos[0, slot])])
    assert torch.equal(out.x[0, 4], torch.zeros(3)) and out.source[0, 4].sum() == 0
    assert torch.equal(out.source[0, 1:4].argmax(-1), out.pos[0, 1:4])


def test_num_samples_floor_and_cap():
    assert num_samples(0.5, 196) == 98
    assert num_samples(1.0, 196) == 196
    assert num_samples(0.02, 196) == 8  # the reference's floor
    assert num_samples(0.02, 5) == 5  # capped at the patch count


# -- the shared invariants on a tiny ViT --------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [{"blocks": BLOCKS}, {"blocks": BLOCKS, "keep_rate": [0.9, 0.5, 0.7]}, {"blocks": [2], "keep_rate": 1.0}],
)
def test_runs_with_static_slots_and_per_image_counts(kw, images):
    model = tiny_vit()
    reducer = build_reducer("ats", **kw)
    logits, steps, ctx = run_capturing(model, reducer, images)
    assert torch.isfinite(logits).all()
    assert ctx.token_trace == [out for _, out in reducer.token_counts(1, NUM_PATCHES, 6)]
    assert [b for b, _, _ in steps] == kw["blocks"]
    assert reducer.needs(kw["blocks"][0]) == {CLS_ATTN, VALUES}
    for block, before, after in steps:
        p = before.num_prefix
        assert torch.equal(after.x[:, :p], before.x[:, :p]) and after.may_have_empty
        k = reducer.num_samples(block, NUM_PATCHES)
        assert after.num_tokens == p + min(k, before.num_tokens - p)
        # the reducer keeps what the equations choose, from the block's own taps
        scores = significance_scores(before.cls_attn, before.values, p, before.size > 0)
        chosen = ats_select(scores, k, after.num_tokens - p)
        filled = chosen >= 0
        assert torch.equal(after.size[:, p:] > 0, filled)
        rows = torch.gather(before.x[:, p:], 1, chosen.clamp_min(0)[..., None].expand(-1, -1, before.x.shape[-1]))
        assert torch.equal(after.x[:, p:][filled], rows[filled]), "kept tokens are copied exactly"
        assert (after.x[:, p:][~filled] == 0).all() and (after.pos[:, p:][~filled] == -1).all()
        # never an empty slot picked, never a token twice
        for i in range(len(images)):
            kept = after.pos[i, p:][filled[i]].tolist()
            assert len(kept) == len(set(kept)) and -1 not in kept
        assert torch.equal(after.source[:, p:].sum(-1), after.size[:, p:])


def test_keep_rate_one_keeps_every_slot_but_fills_fewer(images):
    model = tiny_vit(depth=12)
    reducer = build_reducer("ats", keep_rate=1.0)
    apply_reducer(model, reducer)
    filled = filled_counts(model, images)
    assert reducer.token_counts(1, NUM_PATCHES, 12) == [(65, 65)] * 12
    assert filled[:3] == [65.0] * 3
    assert all(a >= b for a, b in zip(filled, filled[1:], strict=False)) and filled[-1] < 65
    assert filled[3] <= 64, "with no empty slot the lowest-scoring token is never sampled"


def test_layouts_with_more_or_no_prefix_tokens():
    distilled = tiny_distilled_vit()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for model, prefix in (
        (distilled, 2),
        (tiny_vit(reg_tokens=4), 5),
        (tiny_vit(class_token=False, global_pool="avg"), 0),
    ):
        reducer = build_reducer("ats", blocks=BLOCKS, keep_rate=0.6)
        logits, steps, ctx = run_capturing(model, reducer, images)
        assert torch.isfinite(logits).all()
        assert ctx.token_trace == [out for _, out in reducer.token_counts(prefix, NUM_PATCHES, 6)]
        assert reducer.needs(1) == ({ATTN, VALUES} if prefix == 0 else {CLS_ATTN, VALUES})
        for _, before, after in steps:
            assert torch.equal(after.x[:, :prefix], before.x[:, :prefix])
            assert (after.size[:, prefix:] > 0).any(-1).all()


def test_default_budget_is_the_papers_deit_s_gflops():
    """keep_rate 0.5: static slots at the paper's DeiT-S + ATS cost, 2.9 of 4.6 GFLOPs."""
    with torch.device("meta"):
        deit_s = timm.create_model("deit_small_patch16_224")
    from bench.measure.flops import analytic_macs
    from methods.identity import NoReduction

    shape, info = VitShape.of(deit_s), model_info(deit_s)
    reducer, base = build_reducer("ats"), NoReduction()
    reducer.bind(info)
    base.bind(info)
    ratio = analytic_macs(shape, reducer, 196) / analytic_macs(shape, base, 196)
    assert ratio == pytest.approx(2.9 / 4.6, abs=0.01)


def test_overhead_is_the_class_attention_row():
    reducer = build_reducer("ats", blocks=[2])
    reducer.bind(ModelInfo(depth=4, num_heads=3, embed_dim=48, num_prefix=1, patch_grid=(8, 8)))
    assert reducer.overhead_macs(2, 65, 48, 3) == 65 * 48 and reducer.overhead_macs(1, 65, 48, 3) == 0
    reducer.bind(ModelInfo(depth=4, num_heads=3, embed_dim=48, num_prefix=0, patch_grid=(8, 8)))
    assert reducer.overhead_macs(2, 64, 48, 3) == 0


def test_notes_say_when_the_floor_of_eight_samples_applies():
    info = ModelInfo(depth=6, num_heads=3, embed_dim=48, num_prefix=1, patch_grid=(8, 8))
    reducer = build_reducer("ats", blocks=BLOCKS, keep_rate=0.5)
    reducer.bind(info)
    assert reducer.notes() == []
    reducer = build_reducer("ats", blocks=BLOCKS, keep_rate=[0.05, 0.5, 0.05])
    reducer.bind(info)
    assert reducer.notes() == [
        "K raised to the reference's floor of 8 samples in 2 of 3 ATS blocks (keep_rate 0.05 of 64 patches asks fewer)"
    ]


def test_bad_knobs_are_refused():
    for bad in (0, -0.1, 1.2, True, "0.5"):
        with pytest.raises(BenchError, match="keep_rate"):
            build_reducer("ats", keep_rate=bad)
    with pytest.raises(BenchError, match="keep_rate has 2 values but there are 3"):
        build_reducer("ats", blocks=BLOCKS, keep_rate=[0.5, 0.5])
    with pytest.raises(BenchError, match="strictly increasing"):
        build_reducer("ats", blocks=[3, 3])
    with pytest.raises(BenchError, match="prop_attn"):
        build_reducer("ats", prop_attn="yes")
    model = tiny_vit()
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ReducerConfigError, match="outside the model's depth: valid blocks are 0..5"):
        apply_reducer(model, ATS())  # the default blocks 3..11 on a 6-block ViT
    assert calls == []
