"""DiffRate: the step on hand-made tokens, the schedule, parity with the reference's algorithm,
the shared invariants, budget matching, capture, bad knobs, and the differentiable search."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import build_reducer, tiny_distilled_vit, tiny_vit
from helpers import run_capturing

from bench.budget import match_budget
from bench.measure.flops import VitShape
from methods import ReducerConfigError, apply_reducer, reduction_context
from methods.base import TokenState
from methods.diffrate import (
    ATTN_SIZE,
    MASK_LOGIT,
    DiffRate,
    _MaskBias,
    diffrate_step,
    effective_fracs,
    resample,
    schedule_counts,
)
from methods.patch import model_info
from methods.tokens import initial_state

CONFIGS = ["diffrate", "diffrate_deit_s", "diffrate_deit_b"]
DEIT_T_08 = (
    [197, 197, 196, 186, 166, 147, 117, 103, 92, 80, 74, 3],
    [197, 196, 190, 172, 154, 125, 107, 96, 84, 78, 70, 3],
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# -- the step on hand-made tokens ---------------------------------------------------------------------


def _state(x: torch.Tensor, cls_row: torch.Tensor, num_prefix: int = 1) -> TokenState:
    st = initial_state(x, num_prefix, (1, x.shape[1] - num_prefix), trace_source=True)
    return st.replace(cls_attn=cls_row[:, None, :].expand(-1, 2, -1))


def test_prune_keeps_the_tokens_the_class_token_attends_to():
    x = torch.randn(1, 6, 4)
    cls = torch.tensor([[0.5, 0.1, 0.4, 0.05, 0.3, 0.2]])  # patch ranks: 2, 4, 5, 1, 3
    out = diffrate_step(_state(x, cls), kept=3, merged=3, prop_attn="similarity")
    assert torch.equal(out.x, x[:, [0, 2, 4, 5]])
    assert out.pos.tolist() == [[-1, 1, 3, 4]] and out.size.tolist() == [[1, 1, 1, 1]]


def test_merge_is_a_plain_mean_into_the_most_similar_kept_token():
    # patch tokens (after the class token): a, b destinations (ranked first); c ~ a, d ~ b, e ~ a
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    c, d, e = torch.tensor([2.0, 0.2, 0.0]), torch.tensor([0.1, 3.0, 0.0]), torch.tensor([1.0, -0.5, 0.1])
    cls_tok = torch.tensor([5.0, 5.0, 5.0])  # the class token is never a destination
    x = torch.stack([cls_tok, a, b, c, d, e])[None]
    cls = torch.tensor([[0.3, 0.25, 0.2, 0.15, 0.1, 0.05]])
    st = _state(x, cls)
    st = st.replace(size=torch.tensor([[1.0, 2.0, 1.0, 3.0, 1.0, 1.0]]))  # a stands for 2 patches, c for 3
    out = diffrate_step(st, kept=5, merged=2, prop_attn="similarity")
    assert out.x.shape == (1, 3, 3)
    assert torch.equal(out.x[:, 0], cls_tok[None])
    assert torch.allclose(out.x[0, 1], (a + c + e) / 3)  # unweighted mean, the reference's scatter_reduce
    assert torch.allclose(out.x[0, 2], (b + d) / 2)
    assert out.size.tolist() == [[1.0, 2 + 3 + 1, 1 + 1]]  # patch counts add up
    cos = F.cosine_similarity
    want = torch.tensor([1.0, 2 + 3 * cos(c, a, dim=0) + 1 * cos(e, a, dim=0), 1 + cos(d, b, dim=0)])
    assert torch.allclose(out.extra[ATTN_SIZE][0], want)  # sources add size x similarity
    assert out.pos.tolist() == [[-1, -1, -1]]
    size_mode = diffrate_step(st, kept=5, merged=2, prop_attn="size")
    assert torch.equal(size_mode.extra[ATTN_SIZE], size_mode.size)


def test_prune_then_merge_drops_the_lowest_ranked_first():
    x = torch.randn(2, 9, 5, generator=torch.Generator().manual_seed(0))
    cls = torch.rand(2, 9, generator=torch.Generator().manual_seed(1))
    out = diffrate_step(_state(x, cls), kept=5, merged=3, prop_attn="similarity")
    order = cls[:, 1:].argsort(-1, descending=True) + 1
    for i in range(2):
        members = set(torch.nonzero(out.source[i].sum(0)).flatten().add(1).tolist())
        assert members == set(order[i, :5].tolist())  # the 3 lowest-ranked were dropped, not merged
    assert out.size[:, 1:].sum(-1).tolist() == [5.0, 5.0]


def test_a_dissimilar_source_adds_nothing_to_the_attention_size():
    x = torch.tensor([[[1.0, 1.0], [1.0, 0.0], [-1.0, 0.0]]])
    out = diffrate_step(_state(x, torch.tensor([[0.5, 0.3, 0.2]])), kept=2, merged=1, prop_attn="similarity")
    assert out.extra[ATTN_SIZE].tolist() == [[1.0, 1.0]]  # cosine -1: clamped to 0, not 1 - 1 = 0 -> log 0
    assert out.size.tolist() == [[1.0, 2.0]]


# -- the schedule ---------------------------------------------------------------------------------------


def test_published_schedule_is_used_exactly_on_deit():
    r = build_reducer("diffrate")
    assert (r.hparams["prune_kept"], r.hparams["merge_kept"]) == DEIT_T_08
    live, want = 197, []
    for p, m in zip(*DEIT_T_08, strict=True):
        out = min(live, p, m)
        want.append((live, out))
        live = out
    assert r.token_counts(1, 196, 12) == want
    assert r.schedule(196) == DEIT_T_08


def test_schedule_counts_scale_and_resample():
    pf, mf = [1.0, 0.5, 0.6, 0.25], [0.9, 0.5, 0.4, 0.5]
    assert schedule_counts(pf, mf, 100, 4) == [(100, 100, 90), (90, 50, 50), (50, 50, 40), (40, 25, 25)]
    assert schedule_counts(pf, mf, 100, 4, scale=0.0) == [(100, 100, 100)] * 4
    assert resample(pf, 4) == pf
    assert resample([0.5, 0.25], 4) == [0.75, 0.5, 0.375, 0.25]
    assert effective_fracs(pf, mf, 4) == [0.9, 0.5, 0.4, 0.25]
    # the knob: MACs never rise as scale grows
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    info, shape = model_info(model), VitShape.of(model)
    last = math.inf
    from bench.measure.flops import analytic_macs

    for s in [0.0, 0.3, 0.7, 1.0, 1.2, 2.0, 4.0]:
        r = build_reducer("diffrate", scale=s)
        r.bind(info)
        macs = analytic_macs(shape, r, 196)
        assert macs <= last
        last = macs


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("ratio", [0.8, 0.65, 0.5])
def test_budget_is_met_on_deit_tiny(name, ratio):
    with torch.device("meta"):
        model = timm.create_model("deit_tiny_patch16_224")
    sol = match_budget(build_reducer(name), ratio, VitShape.of(model), model_info(model), method=name)
    assert sol.ratio == pytest.approx(ratio, rel=0.02)


# -- parity with the reference's algorithm ---------------------------------------------------------------


def _reference_forward(model, images, prune, merge, clamp_negative=False):
    """The reference's evaluation forward (DiffRate/patch/deit.py + merge.py), written out on
    timm's blocks: sort everything by class attention, slice, merge into the kept tokens with
    ``scatter_reduce(mean)``, sizes with similarity, proportional attention in every block."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    b, n, c = x.shape
    size = torch.ones(b, n, 1)
    for blk, p_num, m_num in zip(model.blocks, prune, merge, strict=True):
        att = blk.attn
        h = att.num_heads
        q, k, v = att.qkv(blk.norm1(x)).reshape(b, x.shape[1], 3, h, c // h).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * att.scale + size.log()[:, None, None, :, 0]).softmax(-1)
        x = x + att.proj((a @ v).transpose(1, 2).reshape(b, -1, c))
        idx = a[:, :, 0, 1:].mean(1).argsort(-1, descending=True) + 1
        idx = torch.cat([torch.zeros(b, 1, dtype=torch.long), idx], 1)
        x = x.gather(1, idx[..., None].expand(-1, -1, c))[:, :p_num]
        size = size.gather(1, idx[..., None])[:, :p_num]
        if m_num < p_num:
            metric = x / x.norm(dim=-1, keepdim=True)
            sim = metric[:, m_num:] @ metric[:, :m_num].transpose(-1, -2)
            sim[..., :, 0] = -math.inf
            node_max, node_idx = sim.max(-1)
            if clamp_negative:
                node_max = node_max.clamp_min(0)
            dst = node_idx[..., None]
            x = x[:, :m_num].scatter_reduce(1, dst.expand(-1, -1, c), x[:, m_num:], reduce="mean")
            size = torch.cat([size[:, :m_num], size[:, m_num:] * node_max[..., None]], 1)
            size = size[:, :m_num].scatter_reduce(1, dst, size[:, m_num:], reduce="sum")
        x = x + blk.mlp(blk.norm2(x))
    return model.forward_head(model.norm(x))


def test_matches_the_reference_algorithm_on_a_tiny_vit(images):
    model = tiny_vit(depth=4)
    prune, merge = [65, 50, 40, 30], [60, 40, 35, 3]
    with torch.no_grad():
        want = _reference_forward(model, images, prune, merge, clamp_negative=True)
        apply_reducer(model, DiffRate(prune_kept=prune, merge_kept=merge, ref_patches=64))
        got = model(images)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_matches_the_reference_on_real_deit_tiny(deit_tiny, val_batch):
    model = copy.deepcopy(deit_tiny)
    x = val_batch[0][:4]
    with torch.no_grad():
        want = _reference_forward(model, x, *DEIT_T_08)
        apply_reducer(model, build_reducer("diffrate"))
        got = model(x)
    assert torch.allclose(got, want, atol=1e-3, rtol=1e-3)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


# -- the shared invariants -----------------------------------------------------------------------------------


LAYOUTS = {
    "cls": lambda: tiny_vit(),
    "distilled": tiny_distilled_vit,
    "registers": lambda: tiny_vit(reg_tokens=4, no_embed_class=True),
    "no_cls": lambda: tiny_vit(class_token=False, global_pool="avg"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kw", [{}, {"prune_kept": None}, {"scale": 1.7, "prop_attn": "size"}])
def test_invariants(layout, kw, images):
    model = LAYOUTS[layout]()
    reducer = build_reducer("diffrate", **kw)
    logits, steps, ctx = run_capturing(model, reducer, images)
    assert torch.isfinite(logits).all()
    p = model.num_prefix_tokens
    counts = reducer.token_counts(p, 64, 6)
    assert ctx.token_trace == [n_out for _, n_out in counts]
    assert steps
    for _, before, after in steps:
        assert after.num_prefix == p
        assert torch.equal(after.x[:, :p], before.x[:, :p])  # prefix first and untouched
        assert torch.equal(after.size[:, p:], after.source.sum(-1)[:, p:])
        assert (after.source.sum(1) <= 1).all()  # a patch is in at most one token
        if kw.get("prune_kept", 0) is None:  # merging only: every patch is still there
            assert torch.equal(after.size[:, p:].sum(-1), torch.full((len(images),), 64.0))
            assert torch.equal(after.source.sum(1), torch.ones(len(images), 64))


def test_no_class_token_ranks_by_attention_received(images):
    model = LAYOUTS["no_cls"]()
    reducer = build_reducer("diffrate")
    apply_reducer(model, reducer)
    assert all(reducer.needs(b) == {"attn"} for b in range(6) if reducer.reduces_at(b))


def test_one_graph(images):
    """The configs differ only in their numbers (tests/test_compile.py captures each on DeiT-Tiny)."""
    model = tiny_vit()
    apply_reducer(model, build_reducer("diffrate"))
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(images)
    assert explained.graph_break_count == 0


# -- bad knobs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"prune_kept": [197, 1]}, "must lie in"),
        ({"prune_kept": [197, 198]}, "must lie in"),
        ({"merge_kept": [197, 150.5]}, "not an integer"),
        ({"merge_kept": "197"}, "non-empty list"),
        ({"prune_kept": [197, 190], "merge_kept": [197]}, "one count per block"),
        ({"prune_kept": None, "merge_kept": None}, "needs a schedule"),
        ({"scale": -0.1}, "scale must be >= 0"),
        ({"scale": float("nan")}, "finite"),
        ({"prop_attn": "yes"}, "prop_attn must be one of"),
        ({"search_target": 0.0}, "search_target must be > 0"),
        ({"search_target": 1.5}, r"fraction of the MACs in \(0, 1\]"),
        ({"granularity": 0}, "granularity"),
        ({"flops_weight": -1}, "flops_weight"),
        ({"ref_patches": 0}, "ref_patches"),
    ],
)
def test_bad_knobs_are_refused_at_construction(kw, match):
    args = {"prune_kept": DEIT_T_08[0], "merge_kept": DEIT_T_08[1], **kw}
    with pytest.raises(ReducerConfigError, match=match):
        DiffRate(**args)


# -- the search -------------------------------------------------------------------------------------------


def test_mask_bias_gives_the_multiplicative_masks_gradient():
    """softmax(l + bias(m)) has, at m in {0, 1}, the gradient of the reference's exp(l)·m / Σ."""
    g = torch.Generator().manual_seed(0)
    logits, w = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    hard = torch.tensor([1.0, 1, 0, 1, 0, 0, 1])
    m1 = hard.clone().requires_grad_(True)
    e = logits.exp() * m1
    ((e / e.sum(-1, keepdim=True)) * w).sum().backward()
    m2 = hard.clone().requires_grad_(True)
    a = (logits + _MaskBias.apply(m2)).softmax(-1)
    (a * w).sum().backward()
    assert torch.allclose(a, hard * logits.exp() / (hard * logits.exp()).sum(-1, keepdim=True), atol=1e-9)
    assert torch.allclose(m2.grad, m1.grad, rtol=1e-4, atol=1e-6)
    assert MASK_LOGIT == 30.0


def _search_model(prop_attn="size"):
    model = tiny_vit()
    reducer = DiffRate(search_target=0.5, prune_kept=None, merge_kept=None, prop_attn=prop_attn)
    apply_reducer(model, reducer)
    with torch.no_grad():  # a decreasing schedule that both prunes and merges in every block
        g = torch.Generator().manual_seed(2)
        for logits, counts in [
            (reducer.prune_logits, [64, 56, 48, 40, 32, 24]),
            (reducer.merge_logits, [64, 52, 44, 36, 28, 4]),
        ]:
            logits.copy_(torch.randn(logits.shape, generator=g) * 0.5)
            for block, c in enumerate(counts):
                logits[block, (64 - c) // 4] += 6.0
    reducer.refresh_schedule()
    return model, reducer


@pytest.mark.parametrize("prop_attn", ["size", "none"])
def test_search_forward_equals_the_discrete_schedule(prop_attn, images):
    """Training mode keeps every token but masks the pruned and merged ones: its output is the
    evaluation forward of the schedule the distributions give (ceil of the expected count)."""
    model, reducer = _search_model(prop_attn)
    model.eval()
    with torch.no_grad():
        want = model(images)
    trace = reduction_context(model).token_trace
    assert trace[-1] < 65
    model.train()
    model.requires_grad_(False)
    reducer.requires_grad_(True)
    got = model(images)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    got.logsumexp(-1).sum().backward()
    assert reducer.prune_logits.grad[1:].abs().sum() > 0 and reducer.merge_logits.grad[1:].abs().sum() > 0
    assert reducer.prune_logits.grad[0].abs().sum() == 0  # the first block never compresses


def test_extra_loss_is_the_flops_penalty_with_a_gradient():
    model, reducer = _search_model()
    model.eval()
    counts = reducer.token_counts(1, 64, 6)
    c = 48
    macs = sum(4 * n * c * c + 2 * n * n * c + 8 * o * c * c for n, o in counts)
    base = 6 * (4 * 65 * c * c + 2 * 65 * 65 * c + 8 * 65 * c * c)
    assert reducer.search_macs()[0].item() == pytest.approx(macs)
    assert reducer.search_macs()[1] == base
    loss = reducer.extra_loss()
    assert loss.item() == pytest.approx(5.0 * (macs / 1e9 - 0.5 * base / 1e9) ** 2, rel=1e-5)
    loss.backward()
    assert reducer.prune_logits.grad[1:].abs().sum() > 0
    assert build_reducer("diffrate").extra_loss().item() == 0.0


def test_searched_schedule_follows_training_loading_and_capture(images, tmp_path):
    model, reducer = _search_model()
    model.train()
    model.requires_grad_(False)
    reducer.requires_grad_(True)
    opt = torch.optim.Adam(reducer.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        (model(images).logsumexp(-1).mean() + 1e4 * reducer.extra_loss()).backward()
        opt.step()
    model.eval()  # the schedule is read from the distributions here, once
    with torch.no_grad():
        e = [math.ceil(v) for v in (reducer.prune_logits.softmax(-1) @ reducer.candidates).tolist()]
    assert reducer.schedule()[0][1:] == [k + 1 for k in e[1:]]
    with torch.no_grad():
        out = model(images)
    counts = reducer.token_counts(1, 64, 6)
    assert reduction_context(model).token_trace == [o for _, o in counts]

    # a fresh reducer loading the state (what evaluating final.pt / reducer.pt does) runs the same
    fresh_model = tiny_vit()
    fresh = DiffRate(search_target=0.5, prune_kept=None, merge_kept=None, prop_attn="size")
    apply_reducer(fresh_model, fresh)
    fresh_model.eval()
    assert fresh.token_counts(1, 64, 6) != counts
    fresh.load_state_dict(reducer.state_dict())
    assert fresh.token_counts(1, 64, 6) == counts
    with torch.no_grad():
        assert torch.equal(fresh_model(images), out)
        assert torch._dynamo.explain(fresh_model)(images).graph_break_count == 0


def test_a_searching_reducer_has_no_budget_knob():
    """The search has its own MACs target; a budget would rescale the searched schedule."""
    from bench.errors import BenchError

    with torch.device("meta"):
        model = timm.create_model("deit_tiny_patch16_224")
    reducer = build_reducer("diffrate", search_target=0.64)
    assert reducer.budget_knob is None and DiffRate.budget_knob == "scale"
    with pytest.raises(BenchError, match="no budget knob"):
        match_budget(reducer, 0.65, VitShape.of(model), model_info(model), method="diffrate")


def test_the_trainer_adds_the_search_penalty_to_the_loss():
    """bench.finetune train=reducer runs the search: the trainer adds ``extra_loss`` to the task
    loss (also through a DDP wrapper's ``module``), and 0 for reducers without one."""
    from types import SimpleNamespace

    from bench.train.trainer import _Training

    penalty = torch.tensor(2.5)
    with_penalty = SimpleNamespace(token_reducer=SimpleNamespace(extra_loss=lambda: penalty))
    for student in (with_penalty, SimpleNamespace(module=with_penalty)):
        run = object.__new__(_Training)
        run.student = student
        assert run._reducer_loss() is penalty
    run.student = SimpleNamespace(token_reducer=SimpleNamespace())
    assert run._reducer_loss() == 0.0


@pytest.mark.parametrize("batch", [1, 5])
def test_matching_normalises_only_the_candidates_with_the_same_bits(batch):
    """``match`` copies and normalises only the kept tokens' rows (pruned tokens take no part);
    the similarities and partners must be the bits of normalising every token first."""
    from methods.diffrate import match
    from methods.tokens import batch_gather, unit_rows

    g = torch.Generator().manual_seed(batch)
    for scale in (1e-3, 1.0, 40.0):
        x = torch.randn(batch, 197, 192, generator=g) * scale
        order = torch.stack([torch.randperm(196, generator=g) + 1 for _ in range(batch)])
        kept, merged = 170, 140
        unit = unit_rows(x)
        src, dst = batch_gather(unit, order[:, merged:kept]), batch_gather(unit, order[:, :merged])
        want = (src @ dst.transpose(1, 2)).max(-1)
        got = match(x, order[:, :kept], merged)
        assert torch.equal(got.values, want.values) and torch.equal(got.indices, want.indices)
