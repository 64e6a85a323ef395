"""MCTF (methods/mctf.py): its criteria and matching on hand-made tokens, a slow per-image
reference, the shared invariants on a tiny ViT. Budgets and one compiled graph: the
generic tests/test_budgets.py and tests/test_compile.py."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from conftest import build_reducer, tiny_vit
from helpers import assert_step_invariants, hand_state, membership, run_capturing

from bench.errors import BenchError
from methods import ReducerConfigError, apply_reducer
from methods.base import TokenState
from methods.mctf import (
    MCTF,
    bidirectional_groups,
    fused_count,
    mctf_fuse,
    mctf_schedule,
    mctf_scores,
    normalised_inverse,
    pool_groups,
    received_attention,
)
from methods.patch import model_info

NUM_PATCHES = 64  # tiny_vit: 8x8 grid

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _state(x: torch.Tensor, attn: torch.Tensor, num_prefix: int, size: torch.Tensor | None = None) -> TokenState:
    return hand_state(x, num_prefix, size, attn=attn)


def _random_attn(b: int, h: int, n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(b, h, n, n, generator=g).mul(2).softmax(-1)


# -- the equations ------------------------------------------------------------------------------------
def test_informativeness_is_the_normalised_inverse_of_received_attention():
    # two heads, three queries; column j is the attention token j receives
    attn = torch.tensor(
        [
            [[0.5, 0.25, 0.25], [0.5, 0.25, 0.25], [0.5, 0.25, 0.25]],
            [[0.7, 0.2, 0.1], [0.7, 0.2, 0.1], [0.7, 0.2, 0.1]],
        ]
    )[None]
    received = received_attention(attn)
    assert torch.allclose(received, torch.tensor([[0.6, 0.225, 0.175]]))
    info = normalised_inverse(received)
    assert torch.allclose(info, torch.tensor([[0.175 / 0.6, 0.175 / 0.225, 1.0]]))
    # sizes: the smallest token gets 1, a token of size 4 a quarter of it
    assert torch.allclose(normalised_inverse(torch.tensor([[1.0, 2.0, 4.0]])), torch.tensor([[1.0, 0.5, 0.25]]))


def test_scores_multiply_the_three_criteria():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # A = tokens 0, 2; B = tokens 1, 3: cos(A0,B1) = 1, cos(A0,B3) = 0, cos(A2,B1) = -1, cos(A2,B3) = 1
    metric = torch.stack([e1, 3 * e1, -e1, 2 * e2])[None]
    uniform = torch.full((1, 1, 4, 4), 0.25)
    got = mctf_scores(metric, uniform, torch.ones(1, 4), 0, tau_sim=1, tau_info=20, tau_size=40)
    assert torch.allclose(got[0], torch.tensor([[1.0, 0.5], [0.0, 0.5]]), atol=1e-6)  # (cos + 1) / 2
    assert torch.allclose(
        mctf_scores(metric, uniform, torch.ones(1, 4), 0, tau_sim=2, tau_info=0, tau_size=0)[0],
        torch.tensor([[1.0, 0.5**0.5], [0.0, 0.5**0.5]]),
        atol=1e-6,
    )
    # size: token 1 stands for 4 patches, token 3 for 2: σ = [1, 1/4, 1, 1/2]
    size = torch.tensor([[1.0, 4.0, 1.0, 2.0]])
    got = mctf_scores(metric, uniform, size, 0, tau_sim=1, tau_info=0, tau_size=2)
    want = torch.tensor([[1.0 * 0.25**0.5, 0.5 * 0.5**0.5], [0.0, 0.5 * 0.5**0.5]])
    assert torch.allclose(got[0], want, atol=1e-6)
    # informativeness: token 1 receives twice the attention of the others: ι = [1, 1/2, 1, 1]
    attn = torch.tensor([0.2, 0.4, 0.2, 0.2]).expand(1, 1, 4, 4)
    got = mctf_scores(metric, attn, torch.ones(1, 4), 0, tau_sim=0, tau_info=1, tau_size=0)
    assert torch.allclose(got[0], torch.tensor([[0.5, 1.0], [0.5, 1.0]]), atol=1e-6)
    # every criterion off: all ones; a prefix token never scores
    got = mctf_scores(metric, attn, size, 1, tau_sim=0, tau_info=0, tau_size=0)
    assert torch.isneginf(got[0, 0]).all() and torch.equal(got[0, 1], torch.ones(2))
    got = mctf_scores(metric, attn, size, 2, tau_sim=1, tau_info=20, tau_size=40)
    assert torch.isneginf(got[0, 0]).all() and torch.isneginf(got[0, :, 0]).all() and torch.isfinite(got[0, 1, 1])


def test_similarity_rounded_below_minus_one_scores_zero():
    """``cos`` of opposite tokens rounds to just under -1 in float32 here, so ``(cos + 1) / 2``
    is negative; the similarity is clamped at 0 (a negative score would flip the criteria's
    product), the per-token criteria need no clamp (they are never negative)."""
    v = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    metric = torch.cat([v, -v, v, v])[None]
    got = mctf_scores(metric, None, torch.ones(1, 4), 0, tau_sim=1, tau_info=0, tau_size=40)
    assert got[0, 0, 0] == 0 and (got >= 0).all()


def test_bidirectional_matching_by_hand():
    # rows: A tokens 0, 2, 4; columns: B tokens 1, 3, 5
    scores = torch.tensor([[0.9, 0.1, 0.1], [0.2, 0.5, 0.1], [0.1, 0.2, 0.7]])[None]
    # step 1: A0 has the best edge and fuses into B1; step 2: of B1 (0.2 to A2), B3 (0.5 to A2)
    # and B5 (0.7 to A4), B5 fuses into A4. Slots: A2, A4, then B1, B3.
    group, num_out = bidirectional_groups(scores, 2, 0)
    assert num_out == 4 and group[0].tolist() == [2, 2, 0, 3, 1, 1]
    # one-way: both fusions go A -> B (A0 -> B1, A4 -> B5); slots: A2, then B1, B3, B5
    group, num_out = bidirectional_groups(scores, 2, 0, bidirectional=False)
    assert num_out == 4 and group[0].tolist() == [1, 1, 0, 2, 3, 3]
    # B1, which took A0 in step 1, now has the best edge back (0.8 to A2): it takes A0 along
    scores = torch.tensor([[0.9, 0.1, 0.1], [0.8, 0.5, 0.1], [0.1, 0.2, 0.7]])[None]
    group, num_out = bidirectional_groups(scores, 2, 0)
    assert num_out == 4 and group[0].tolist() == [0, 0, 0, 2, 1, 3]


def test_attention_weighted_pooling():
    x = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    size = torch.tensor([[1.0, 1.0, 2.0, 1.0]])
    st = _state(x, None, 1, size)
    received = torch.tensor([[0.4, 0.3, 0.1, 0.2]])
    group = torch.tensor([[0, 1, 1, 2]])
    out = pool_groups(st, group, 3, weight=received * size)
    # w = [0.3, 0.2] for tokens 1 and 2: (0.3·[1, 0] + 0.2·[0, 1]) / 0.5
    assert torch.allclose(out.x[0, 1], torch.tensor([0.6, 0.4]))
    assert torch.equal(out.x[0, 0], x[0, 0]) and torch.equal(out.x[0, 2], x[0, 3]), "lone tokens are copied"
    assert out.size[0].tolist() == [1, 3, 1] and out.pos[0].tolist() == [-1, -1, 2]
    assert out.source[0, 1].tolist() == [1, 2, 0] and out.reduced


def test_lone_tokens_keep_every_bit_and_their_position():
    """Weights whose ``(w·x)/w`` is not ``x`` in float32: lone tokens must still come out
    bit for bit (a zero weight included), merged ones as the weighted mean."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 16, generator=g) * 10
    st = _state(x, None, 1)
    st = st.replace(pos=torch.tensor([[-1, 0, 1, 2, 3, 4, 5], [-1, 9, 8, 7, 6, 5, 4]]))
    weight = torch.rand(2, 7, generator=g) * 0.3 + 0.01
    weight[1, 6] = 0.0
    group = torch.tensor([[0, 1, 2, 1, 3, 4, 2], [0, 1, 1, 2, 3, 3, 4]])
    merged = x * weight[..., None]
    assert not torch.equal(merged / weight[..., None], x), "the weights must make the plain round trip inexact"
    out = pool_groups(st, group, 5, weight=weight)
    for b, lone in ((0, [(0, 0), (3, 4), (4, 5)]), (1, [(0, 0), (2, 3), (4, 6)])):
        for slot, token in lone:
            assert torch.equal(out.x[b, slot], x[b, token]), f"image {b}: lone token {token} changed"
            assert out.pos[b, slot] == st.pos[b, token]
    assert out.pos[0].tolist() == [-1, -1, -1, 3, 4] and out.pos[1].tolist() == [-1, -1, 7, -1, 4]
    w = weight[0, [1, 3]]
    expected = (x[0, 1] * w[0] + x[0, 3] * w[1]) / w.sum()
    torch.testing.assert_close(out.x[0, 1], expected)


def test_caps_and_schedule():
    assert fused_count(197, 1, 16) == 16
    assert fused_count(37, 1, 16) == 16  # 21 tokens are left: more than 10
    assert fused_count(20, 1, 16) == 9  # half the 19 patches
    assert fused_count(12, 1, 16) == 2  # at least 10 tokens stay
    assert fused_count(10, 1, 16) == 0 and fused_count(197, 1, 0) == 0
    assert mctf_schedule(16, 11) == [16] * 11
    frac = mctf_schedule(7.5, 11)
    assert sum(frac) == round(7.5 * 11) and set(frac) <= {7, 8}


def _slow_mctf(x, attn, size, r, prefix, taus, bidirectional, pooling):
    """One image at a time, from the reference's description, with lists and doubles."""
    tau_sim, tau_info, tau_size = taus
    outs = []
    for b in range(x.shape[0]):
        n = x.shape[1]
        xs = torch.nn.functional.normalize(x[b].double(), dim=-1)
        recv = attn[b].double().mean(dim=(0, 1)).tolist()
        sz = size[b].double().tolist()
        info = [(1 / v) / max(1 / u for u in recv) for v in recv]
        small = [(1 / v) / max(1 / u for u in sz) for v in sz]

        def score(i, j, xs=xs, info=info, small=small):
            s = 1.0
            if tau_sim:
                s *= ((float(xs[i] @ xs[j]) + 1) / 2) ** (1 / tau_sim)
            if tau_info:
                s *= (info[i] * info[j]) ** (1 / tau_info)
            if tau_size:
                s *= (small[i] * small[j]) ** (1 / tau_size)
            return s

        a_set = [i for i in range(0, n, 2) if i >= prefix]
        b_set = [j for j in range(1, n, 2) if j >= prefix]
        r1, r2 = (r // 2, r - r // 2) if bidirectional else (r, 0)
        best = {i: max(b_set, key=lambda j, i=i: (score(i, j), -j)) for i in a_set}
        order = sorted(a_set, key=lambda i: -score(i, best[i]))
        src = order[:r1]
        members = {t: [t] for t in range(n)}
        for i in src:
            members[best[i]] += members.pop(i)
        rest_a = sorted(set(a_set) - set(src))
        best2 = {j: max(rest_a, key=lambda i, j=j: (score(i, j), -i)) for j in b_set} if r2 else {}
        order2 = sorted(b_set, key=lambda j: -score(best2[j], j)) if r2 else []
        for j in order2[:r2]:
            members[best2[j]] += members.pop(j)
        slots = list(range(prefix)) + rest_a + sorted(set(b_set) - set(order2[:r2]))
        rows = []
        for t in slots:
            ms = members[t]
            w = torch.tensor([sz[m] * (recv[m] if pooling == "attention" else 1.0) for m in ms], dtype=torch.float64)
            rows.append((x[b, ms].double() * w[:, None]).sum(0) / w.sum())
        outs.append(torch.stack(rows))
    return torch.stack(outs)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_matches_slow_reference(bidirectional, prefix):
    g = torch.Generator().manual_seed(5 + prefix)
    n = prefix + 21
    x = torch.randn(2, n, 6, generator=g)
    attn = _random_attn(2, 3, n, g)
    size = torch.randint(1, 5, (2, n), generator=g).float()
    size[:, :prefix] = 1
    for r, taus, pooling in [(1, (1, 20, 40), "attention"), (6, (1, 20, 40), "attention"), (10, (2, 1, 3), "size")]:
        st = _state(x, attn, prefix, size)
        out = mctf_fuse(st, r, *taus, bidirectional=bidirectional, pooling=pooling)
        ref = _slow_mctf(x, attn, size, r, prefix, taus, bidirectional, pooling)
        assert out.x.shape == ref.shape == (2, n - r, 6)
        assert torch.allclose(out.x, ref.float(), atol=1e-5)
        assert torch.equal(out.x[:, :prefix], x[:, :prefix])
        assert torch.all(out.size.sum(-1) == size.sum(-1))


def test_groups_fill_every_slot_once():
    g = torch.Generator().manual_seed(2)
    for p, n in [(0, 20), (1, 23), (2, 22), (5, 25)]:
        x, attn = torch.randn(3, n, 4, generator=g), _random_attn(3, 2, n, g)
        scores = mctf_scores(x, attn, torch.ones(3, n), p, 1, 20, 40)
        for bidirectional in (True, False):
            for r in range(1, (n - p) // 2 + 1):
                group, num_out = bidirectional_groups(scores, r, p, bidirectional)
                assert num_out == n - r
                assert torch.equal(group[:, :p], torch.arange(p).expand(3, -1))
                assert all(len(set(row.tolist())) == num_out for row in group)
                assert not torch.isin(group[:, p:], torch.arange(p)).any()


def test_size_and_informativeness_steer_the_fusion():
    """Two equally similar candidates: the bigger one, or the one attended more, is spared."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, generator=g)
    others = torch.randn(4, 6, generator=g) * 3
    # tokens 0 and 2 (set A) are both identical to token 1 (set B); one fusion (r=1, one-way)
    x = torch.stack([base, base, base, others[0], others[1], others[2]])[None]
    uniform = torch.full((1, 1, 6, 6), 1 / 6)
    size = torch.tensor([[1.0, 1.0, 3.0, 1.0, 1.0, 1.0]])
    group, _ = bidirectional_groups(mctf_scores(x, uniform, size, 0, 1, 20, 1), 1, 0, bidirectional=False)
    assert group[0, 0] == group[0, 1] != group[0, 2], "the size-3 token must not be the one fused"
    attn = torch.tensor([0.3, 0.1, 0.1, 0.1, 0.2, 0.2]).expand(1, 1, 6, 6)
    group, _ = bidirectional_groups(mctf_scores(x, attn, torch.ones(1, 6), 0, 1, 1, 40), 1, 0, bidirectional=False)
    assert group[0, 2] == group[0, 1] != group[0, 0], "the token attended most must not be the one fused"


# -- the shared invariants on a tiny ViT --------------------------------------------------------------
@pytest.mark.parametrize(
    "kw", [{}, {"r": 5, "bidirectional": False, "pooling": "size"}, {"r": 7.5, "first_block": 0, "prop_attn": False}]
)
def test_runs_with_valid_steps(kw, images):
    model = tiny_vit()
    reducer = build_reducer("mctf", **kw)
    logits, steps, ctx = run_capturing(model, reducer, images)
    assert torch.isfinite(logits).all()
    assert ctx.token_trace == [out for _, out in reducer.token_counts(1, NUM_PATCHES, 6)]
    assert [b for b, _, _ in steps] == [b for b in range(6) if reducer.schedule[b] > 0]
    assert reducer.proportional_attention is kw.get("prop_attn", True)
    attention = kw.get("pooling", "attention") == "attention"
    for _, before, after in steps:
        p = before.num_prefix
        assert_step_invariants(before, after)
        # every step-input token went to one output token: the mean of its members weighted
        # by size × the attention each receives in this block
        member = membership(before, after)
        assert torch.all(member.sum(1) == 1)
        w = before.size[:, p:] * (received_attention(before.attn)[:, p:] if attention else 1)
        w = member * w[:, None, :]
        assert torch.allclose(after.x[:, p:], (w @ before.x[:, p:]) / w.sum(-1, keepdim=True), atol=1e-5)


def test_r_zero_changes_nothing(images):
    model = tiny_vit()
    with torch.no_grad():
        ref = model(images)
    logits, steps, ctx = run_capturing(model, build_reducer("mctf", r=0), images)
    assert ctx.token_trace == [65] * 6 and steps == []
    assert (logits - ref).abs().max() < 1e-5


def test_caps_are_noted():
    model = tiny_vit()
    reducer = build_reducer("mctf")  # r = 16 on 65 tokens: 49, 33, 17, then capped
    apply_reducer(model, reducer)
    assert reducer.token_counts(1, NUM_PATCHES, 6) == [(65, 65), (65, 49), (49, 33), (33, 17), (17, 10), (10, 10)]
    assert reducer.notes() == [
        "r capped in 2 of 6 blocks (first: block 4 fuses 7 of the 16 asked; a block fuses at most half its "
        "non-prefix tokens and leaves at least 10)"
    ]
    with torch.device("meta"):
        deit = timm.create_model("deit_tiny_patch16_224")
    reducer.bind(model_info(deit))
    assert reducer.notes() == []  # the reference's r = 16 on DeiT: 197 -> 21 tokens, never capped
    assert reducer.token_counts(1, 196, 12)[-1] == (37, 21)


def test_schedule_skips_block_zero_on_twelve_blocks():
    reducer = build_reducer("mctf", r=5.5)
    reducer.bind(model_info(tiny_vit(depth=12)))
    assert reducer.schedule[0] == 0 and min(reducer.schedule[1:]) > 0


def test_bad_knobs_are_refused():
    for bad in (-1, True, "16", None, math.nan):
        with pytest.raises(BenchError, match="r "):
            build_reducer("mctf", r=bad)
    for bad in (-1, 1.5, True):
        with pytest.raises(BenchError, match="first_block"):
            build_reducer("mctf", first_block=bad)
    for name in ("tau_sim", "tau_info", "tau_size"):
        for bad in (-0.5, math.inf, "20", None):
            with pytest.raises(BenchError, match=name):
                build_reducer("mctf", **{name: bad})
    with pytest.raises(BenchError, match="bidirectional"):
        build_reducer("mctf", bidirectional="yes")
    with pytest.raises(BenchError, match="pooling"):
        build_reducer("mctf", pooling="max")
    with pytest.raises(BenchError, match="prop_attn"):
        build_reducer("mctf", prop_attn=1)
    with pytest.raises(ReducerConfigError, match="first_block=6 is outside the model's 6 blocks"):
        apply_reducer(tiny_vit(), MCTF(first_block=6))
