"""PiToMe (methods/pitome.py): its equations on hand-made tokens, a slow per-image reference,
the shared invariants on a tiny ViT. Budgets and one compiled graph: the
generic tests/test_budgets.py and tests/test_compile.py."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_reducer, tiny_vit
from helpers import assert_step_invariants, hand_state, membership, patch_sizes, run_capturing

from bench.errors import BenchError
from methods import ReducerConfigError, apply_reducer
from methods.base import TokenState
from methods.patch import model_info
from methods.pitome import PiToMe, energy_scores, margin_schedule, pitome_groups, pitome_merge, pitome_r

NUM_PATCHES = 64  # tiny_vit: 8x8 grid


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _state(x: torch.Tensor, metric: torch.Tensor, num_prefix: int, size: torch.Tensor | None = None) -> TokenState:
    return hand_state(x, num_prefix, size, keys=metric[:, None])  # one head: the head mean is the metric


# -- the equations ------------------------------------------------------------------------------------
def test_energy_is_the_mean_elu_of_cosine_minus_margin():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    metric = torch.stack([2 * e1, e1, 3 * e2])[None]  # cosines [[1,1,0],[1,1,0],[0,0,1]]
    energy, sim = energy_scores(metric, margin=0.5, alpha=1.0)
    assert torch.allclose(sim[0], torch.tensor([[1.0, 1, 0], [1, 1, 0], [0, 0, 1]]), atol=1e-6)
    below = math.exp(-0.5) - 1  # ELU(0 - 0.5)
    want = torch.tensor([(0.5 + 0.5 + below) / 3, (0.5 + 0.5 + below) / 3, (0.5 + 2 * below) / 3])
    assert torch.allclose(energy[0], want, atol=1e-6)
    # alpha scales the negative side only
    energy2, _ = energy_scores(metric, margin=0.5, alpha=2.0)
    assert torch.allclose(energy2[0, 2], torch.tensor((0.5 + 4 * below) / 3), atol=1e-6)


def test_margin_schedule_and_r():
    m = margin_schedule(0.75, 12)
    assert m[0] == 0.75 and m[6] == pytest.approx(0.375) and m[11] == pytest.approx(0.0625)
    assert pitome_r(196, 0.9125) == 17  # floor(196 - 178.85)
    assert pitome_r(196, 0.95) == 9
    assert pitome_r(196, 1.0) == 0
    assert pitome_r(196, 0.5) == 98
    assert pitome_r(5, 0.5) == 2  # capped at T // 2


def test_isolated_tokens_are_protected_and_the_cluster_merges():
    """Late blocks merge only the 2r highest-energy tokens: a 4-token cluster merges pairwise,
    a 2-token group and an isolated token are left exactly as they were."""
    g = torch.Generator().manual_seed(0)
    d = 8
    basis = torch.eye(d)
    cluster = [basis[0] + 0.01 * torch.randn(d, generator=g) for _ in range(4)]
    pair = [basis[1] + 0.01 * torch.randn(d, generator=g) for _ in range(2)]
    lone = [basis[2]]
    tokens = [basis[7], cluster[0], pair[0], cluster[1], lone[0], cluster[2], pair[1], cluster[3]]
    metric = torch.stack(tokens)[None]
    x = torch.randn(1, 8, 5, generator=g)
    out = pitome_merge(_state(x, metric, 1), ratio=0.7, margin=0.5, bsm=False)  # T=7: r = floor(2.1) = 2
    assert out.num_tokens == 1 + 7 - 2
    assert torch.equal(out.x[:, 0], x[:, 0])
    protected = out.x[0, 1:4]  # pair, pair, lone: by energy, highest first
    assert {tuple(t.tolist()) for t in protected} == {tuple(x[0, i].tolist()) for i in (2, 6, 4)}
    assert torch.equal(out.x[0, 3], x[0, 4]), "the isolated token has the lowest energy: last of the protected"
    assert out.size[0, :4].tolist() == [1, 1, 1, 1] and out.size[0, 4:].sum() == 4
    merged = out.source[0, 4:] > 0  # the two merged tokens cover the cluster's patches (0, 2, 4, 6)
    assert sorted(merged.nonzero()[:, 1].tolist()) == [0, 2, 4, 6]


def _slow_pitome(x, metric, size, r, prefix, margin, alpha, bsm):
    """One image at a time, from the reference's description, with lists."""
    outs = []
    for b in range(x.shape[0]):
        m = torch.nn.functional.normalize(metric[b, prefix:].double(), dim=-1)
        t = m.shape[0]
        sim = (m @ m.T).tolist()
        energy = [
            sum(math.exp(s - margin) * alpha - alpha if s < margin else s - margin for s in row) / t for row in sim
        ]
        order = sorted(range(t), key=lambda i: (-energy[i], i))

        def best(i, cands, sim=sim):
            return max(cands, key=lambda c: (sim[i][c], -cands.index(c)))

        if bsm:
            a_set, b_set = order[0::2], order[1::2]
            edges = sorted(a_set, key=lambda i: -sim[i][best(i, b_set)])
            src, alone = edges[:r], edges[r:]
        else:
            alone, src, b_set = order[2 * r :], order[0 : 2 * r : 2], order[1 : 2 * r : 2]
        rows = [x[b, i] for i in range(prefix)] + [x[b, prefix + i] for i in alone]
        for j in b_set:
            members = [j] + [i for i in src if best(i, b_set) == j]
            w = torch.stack([size[b, prefix + i] for i in members])
            rows.append((torch.stack([x[b, prefix + i] for i in members]) * w[:, None]).sum(0) / w.sum())
        outs.append(torch.stack(rows))
    return torch.stack(outs)


@pytest.mark.parametrize("bsm", [True, False])
@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_matches_slow_reference(bsm, prefix):
    g = torch.Generator().manual_seed(3 + prefix)
    n = prefix + 19
    x, metric = torch.randn(2, n, 6, generator=g), torch.randn(2, n, 5, generator=g)
    size = torch.randint(1, 4, (2, n), generator=g).float()
    size[:, :prefix] = 1
    for r in (1, 4, 9):
        out = pitome_merge(_state(x, metric, prefix, size), ratio=1 - r / 19 - 1e-9, margin=0.3, alpha=1.0, bsm=bsm)
        ref = _slow_pitome(x, metric, size, r, prefix, 0.3, 1.0, bsm)
        assert out.x.shape == ref.shape == (2, n - r, 6)
        assert torch.allclose(out.x, ref.float(), atol=1e-5)
        assert torch.equal(out.x[:, :prefix], x[:, :prefix])


def test_groups_fill_every_slot_once():
    metric = torch.randn(3, 23, 4, generator=torch.Generator().manual_seed(1))
    for bsm in (True, False):
        for r in (1, 5, 10):
            group, num_out = pitome_groups(metric, r, 2, margin=0.4, bsm=bsm)
            assert num_out == 23 - r
            assert torch.equal(group[:, :2], torch.arange(2).expand(3, -1))
            assert all(len(set(row.tolist())) == num_out for row in group)
            assert not torch.isin(group[:, 2:], torch.arange(2)).any()


# -- the shared invariants on a tiny ViT --------------------------------------------------------------
@pytest.mark.parametrize(
    "kw", [{}, {"ratio": 0.75, "bsm_blocks": 0}, {"ratio": 0.6, "bsm_blocks": 6, "prop_attn": True}]
)
def test_runs_with_valid_steps(kw, images):
    model = tiny_vit()
    reducer = build_reducer("pitome", **kw)
    logits, steps, ctx = run_capturing(model, reducer, images)
    assert torch.isfinite(logits).all()
    assert ctx.token_trace == [out for _, out in reducer.token_counts(1, NUM_PATCHES, 6)]
    assert [b for b, _, _ in steps] == list(range(6))
    assert reducer.proportional_attention is kw.get("prop_attn", False)
    for _, before, after in steps:
        p = before.num_prefix
        assert_step_invariants(before, after)
        assert torch.all(patch_sizes(after).sum(-1) == NUM_PATCHES)
        # every step-input token went to one output token, the size-weighted mean of its members
        member = membership(before, after)
        assert torch.all(member.sum(1) == 1)
        w = member * before.size[:, None, p:]
        assert torch.allclose(after.x[:, p:], (w @ before.x[:, p:]) / w.sum(-1, keepdim=True), atol=1e-5)


def test_ratio_one_changes_nothing(images):
    model = tiny_vit()
    with torch.no_grad():
        ref = model(images)
    logits, steps, ctx = run_capturing(model, build_reducer("pitome", ratio=1.0), images)
    assert ctx.token_trace == [65] * 6 and steps == []
    assert (logits - ref).abs().max() < 1e-5


def test_half_the_blocks_match_on_twelve_blocks():
    reducer = build_reducer("pitome")
    reducer.bind(model_info(tiny_vit(depth=12)))
    assert reducer.num_bsm == 6  # ceil(12 / 2), the reference's split


def test_bad_knobs_are_refused():
    for bad in (0.3, 1.2, -1, True, "0.9"):
        with pytest.raises(BenchError, match="ratio"):
            build_reducer("pitome", ratio=bad)
    for bad in (1.0, -0.1, None):
        with pytest.raises(BenchError, match="margin"):
            build_reducer("pitome", margin=bad)
    with pytest.raises(BenchError, match="alpha"):
        build_reducer("pitome", alpha=0)
    for bad in (-1, 1.5, True):
        with pytest.raises(BenchError, match="bsm_blocks"):
            build_reducer("pitome", bsm_blocks=bad)
    with pytest.raises(BenchError, match="prop_attn"):
        build_reducer("pitome", prop_attn="yes")
    with pytest.raises(ReducerConfigError, match="bsm_blocks=7 exceeds the model's 6 blocks"):
        apply_reducer(tiny_vit(), PiToMe(bsm_blocks=7))
