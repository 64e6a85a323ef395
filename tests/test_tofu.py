"""ToFu (methods/tofu.py): MLERP and pruning on hand-made tokens, the prune-then-merge
schedule and the shared invariants on a tiny ViT. Budgets and one compiled graph: the
generic tests/test_budgets.py and tests/test_compile.py."""

from __future__ import annotations

import pytest
import torch
from conftest import build_reducer, tiny_vit
from helpers import assert_step_invariants, hand_state, membership, patch_sizes, run_capturing

from bench.errors import BenchError
from methods import ReducerConfigError, apply_reducer
from methods.base import TokenState
from methods.patch import model_info
from methods.tofu import ToFu, mlerp_merge, prune_sources, tofu_step
from methods.tokens import group_counts
from methods.tome import bipartite_groups, bipartite_match, tome_merge

NUM_PATCHES = 64  # tiny_vit: 8x8 grid


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _state(x: torch.Tensor, metric: torch.Tensor | None = None, num_prefix: int = 1) -> TokenState:
    return hand_state(x, num_prefix, keys=None if metric is None else metric[:, None])


# -- the equations ------------------------------------------------------------------------------------
def test_mlerp_is_the_mean_rescaled_to_the_largest_norm():
    x = torch.tensor([[[9.0, 9.0], [3.0, 0.0], [0.0, 4.0], [1.0, 1.0], [2.0, -1.0], [-2.0, -1.0]]])
    group = torch.tensor([[0, 1, 1, 2, 3, 3]])  # (3,0)+(0,4) fused; (2,-1)+(-2,-1) fused
    out = mlerp_merge(_state(x), group, 4)
    # mean (1.5, 2) has norm 2.5; the largest member norm is 4: (2.4, 3.2)
    assert torch.allclose(out.x[0, 1], torch.tensor([2.4, 3.2]))
    # mean (0, -1), largest norm sqrt(5)
    assert torch.allclose(out.x[0, 3], torch.tensor([0.0, -(5**0.5)]))
    assert torch.equal(out.x[0, 0], x[0, 0]) and torch.equal(out.x[0, 2], x[0, 3]), "singletons copied exactly"
    assert out.size[0].tolist() == [1, 2, 1, 2]
    assert out.source[0].tolist() == [[0, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 1]]


def test_mlerp_of_three_tokens_and_of_equal_norms():
    x = torch.tensor([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 5.0]]])
    out = mlerp_merge(_state(x), torch.tensor([[0, 1, 1, 1]]), 2)
    mean = torch.tensor([1.0, 2.0, 5.0]) / 3
    assert torch.allclose(out.x[0, 1], mean / mean.norm() * 5)
    # members of one norm: MLERP keeps that norm (where a plain mean would shrink it)
    y = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    fused = mlerp_merge(_state(y), torch.tensor([[0, 1, 1]]), 2).x[0, 1]
    assert torch.allclose(fused, torch.tensor([0.5**0.5, 0.5**0.5]))


def matched_sources(group: torch.Tensor, num_out: int) -> torch.Tensor:
    """The sources read off ToMe's output slots (how the prune step found them before it skipped
    the slots): set-A tokens (even positions) that share their slot with a destination."""
    shared = group_counts(group, num_out).gather(1, group) > 1
    return shared & (torch.arange(group.shape[1]) % 2 == 0)


@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_prune_drops_exactly_the_sources_tomes_slots_show(prefix):
    g = torch.Generator().manual_seed(10 + prefix)
    n = prefix + 31
    x, metric = torch.randn(3, n, 4, generator=g), torch.randn(3, n, 5, generator=g)
    group, num_out = bipartite_groups(metric, 9, prefix)
    kept = ~matched_sources(group, num_out)
    want = torch.stack([x[b, kept[b]] for b in range(3)])
    assert torch.equal(prune_sources(_state(x, metric, prefix), bipartite_match(metric, 9, prefix)[1]).x, want)


def test_prune_drops_the_source_and_copies_the_rest():
    """cls, t1..t4: A = positions 0 (cls), 2, 4; B = 1, 3. t2 is t1's near twin: with r=1 it
    is the one source, into t1."""
    metric = torch.tensor([[[0.0, 0, 0, 1], [1, 0, 0, 0], [1, 0.01, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]])
    x = torch.randn(1, 5, 3, generator=torch.Generator().manual_seed(0))
    group, num_out = bipartite_groups(metric, 1, 1)
    assert matched_sources(group, num_out).tolist() == [[False, False, True, False, False]]
    pruned = prune_sources(_state(x, metric), bipartite_match(metric, 1, 1)[1])
    assert torch.equal(pruned.x, x[:, [0, 1, 3, 4]])
    assert torch.equal(pruned.pos, torch.tensor([[-1, 0, 2, 3]]))
    assert pruned.size[0].tolist() == [1, 1, 1, 1]
    assert torch.equal(tofu_step(_state(x, metric), 1, prune=True).x, pruned.x)
    fused = tofu_step(_state(x, metric), 1, prune=False)
    want = (x[0, 1] + x[0, 2]) / 2
    want = want / want.norm() * x[0, 1:3].norm(dim=-1).max()
    # ToMe's slots: prefix, unmerged A (t4), then B (t1 with t2 fused in, t3)
    assert fused.num_tokens == 4 and torch.allclose(fused.x[0], torch.stack([x[0, 0], x[0, 4], want, x[0, 3]]))


@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_mlerp_step_is_tome_rescaled_and_prune_keeps_tomes_destinations(prefix):
    """At unit sizes ToMe's weighted mean is the plain mean: ToFu's fused tokens point the same
    way, with the largest member norm; its pruned step keeps exactly ToMe's unmerged tokens and
    destinations as they were."""
    g = torch.Generator().manual_seed(prefix)
    n = prefix + 21
    x, metric = torch.randn(2, n, 6, generator=g), torch.randn(2, n, 5, generator=g)
    state = _state(x, metric, prefix)
    tome = tome_merge(state, 7)
    fused = tofu_step(state, 7, prune=False)
    assert torch.equal(fused.source, tome.source) and torch.equal(fused.size, tome.size)
    member = fused.source[:, prefix:] > 0
    norms = x[:, prefix:].norm(dim=-1)
    top = torch.where(member, norms[:, None, :], torch.zeros(())).amax(-1)
    unit = tome.x[:, prefix:] / tome.x[:, prefix:].norm(dim=-1, keepdim=True)
    assert torch.allclose(fused.x[:, prefix:], unit * top[..., None], atol=1e-5)
    assert torch.equal(fused.x[:, :prefix], x[:, :prefix])
    pruned = tofu_step(state, 7, prune=True)
    assert pruned.num_tokens == n - 7
    kept = pruned.pos[:, prefix:] + prefix
    assert torch.equal(pruned.x[:, prefix:], x.gather(1, kept[..., None].expand(-1, -1, 6)))
    # what survives is each merged slot's destination (B, odd position) and every unmerged token
    for b in range(2):
        for slot in range(n - 7 - prefix):
            cover = tome.source[b, prefix + slot].nonzero().flatten() + prefix
            survivors = [int(t) for t in cover if int(t) in kept[b].tolist()]
            assert len(survivors) == 1, "one token of each slot survives"
            if len(cover) > 1:
                assert survivors[0] % 2 == 1, "the survivor of a merged slot is its set-B destination"


# -- the schedule and the shared invariants -----------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"r": 6, "switch_block": 0}, {"r": 5, "switch_block": 6, "prop_attn": True}])
def test_prunes_then_merges_with_valid_steps(kw, images):
    model = tiny_vit()
    reducer = build_reducer("tofu", **kw)
    logits, steps, ctx = run_capturing(model, reducer, images)
    assert torch.isfinite(logits).all()
    assert ctx.token_trace == [out for _, out in reducer.token_counts(1, NUM_PATCHES, 6)]
    switch = kw.get("switch_block", 6 // 2 + 1)
    assert reducer.switch == switch and reducer.proportional_attention is kw.get("prop_attn", False)
    assert [b for b, _, _ in steps] == list(range(6))
    for block, before, after in steps:
        p = before.num_prefix
        assert_step_invariants(before, after, partition=False)  # pruned before the switch
        assert torch.all(patch_sizes(after) > 0)
        member = membership(before, after)
        if block < switch:  # pruned: each output token is one input token, bit for bit
            assert torch.all(member.sum(-1) == 1)
            idx = member.argmax(-1) + p
            assert torch.equal(after.x[:, p:], before.x.gather(1, idx[..., None].expand(-1, -1, before.x.shape[-1])))
            assert torch.equal(after.size[:, p:], before.size.gather(1, idx))
            assert torch.all(member.sum(1) <= 1)
        else:  # fused: a partition of the input tokens, each the MLERP of its members
            assert torch.all(member.sum(1) == 1)
            mean = (member @ before.x[:, p:]) / member.sum(-1, keepdim=True)
            norms = before.x[:, p:].norm(dim=-1)
            top = (member * norms[:, None, :]).amax(-1)
            want = torch.where(
                member.sum(-1, keepdim=True) > 1, mean / mean.norm(dim=-1, keepdim=True) * top[..., None], mean
            )
            assert torch.allclose(after.x[:, p:], want, atol=1e-5)
            assert torch.allclose(patch_sizes(after).sum(-1), patch_sizes(before).sum(-1))


def test_switch_block_on_twelve_blocks():
    reducer = build_reducer("tofu")
    reducer.bind(model_info(tiny_vit(depth=12)))
    assert reducer.switch == 7  # the references: merge in blocks i > 12 // 2


def test_bad_knobs_are_refused():
    with pytest.raises(BenchError, match="r must be >= 0"):
        build_reducer("tofu", r=-1)
    for bad in (-1, 2.5, True, "7"):
        with pytest.raises(BenchError, match="switch_block"):
            build_reducer("tofu", switch_block=bad)
    with pytest.raises(BenchError, match="prop_attn"):
        build_reducer("tofu", prop_attn=1)
    with pytest.raises(ReducerConfigError, match="switch_block=7 is beyond the model's 6 blocks"):
        apply_reducer(tiny_vit(), ToFu(switch_block=7))
    apply_reducer(tiny_vit(), ToFu(switch_block=6))  # prune everywhere: allowed
