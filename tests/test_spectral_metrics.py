"""Spectral metrics of token sets: hand-computed values, invariances, and the real reducers."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_reducer, tiny_vit
from helpers import run_capturing

from bench.measure.spectral_metrics import (
    effective_rank,
    hf_energy_ratio,
    radial_power_spectrum,
    rank_collapse_residual,
    relative_band_power,
    removed_vs_kept_score,
    scatter_to_grid,
    stable_rank,
    std_score,
    untouched_mask,
)
from methods.base import TokenState
from methods.tokens import initial_state, keep_tokens

# The 3x2 matrix used for hand computations: mean over tokens (3, 2), residual
# [[-2, 0], [0, 2], [2, -2]], ‖res‖²_F = 16, ‖X‖²_F = 1+4+9+16+25+0 = 55.
# ‖res‖_1 = max col abs sum = max(4, 4) = 4, ‖res‖_∞ = max row abs sum = max(2, 2, 4) = 4;
# ‖X‖_1 = max(9, 6) = 9, ‖X‖_∞ = max(3, 7, 5) = 7.
HAND = [[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]]


def hand():
    return torch.tensor([HAND])


def all_metrics(x, size=None, num_prefix=0):
    res = rank_collapse_residual(x, size, num_prefix)
    return {
        "hf": hf_energy_ratio(x, size, num_prefix),
        "erank": effective_rank(x, size, num_prefix),
        "srank": stable_rank(x, size, num_prefix),
        "fro": res["fro"],
        "l1inf": res["l1inf"],
    }


# -- token-space metrics ---------------------------------------------------------------------


def test_hf_ratio_is_zero_for_identical_tokens():
    x = torch.randn(2, 1, 7).expand(2, 9, 7).contiguous() * 1e3 + 0.1
    r = hf_energy_ratio(x)
    assert r.shape == (2,)
    assert torch.equal(r, torch.zeros(2, dtype=torch.float64))


def test_hf_ratio_hand_computed():
    r = hf_energy_ratio(hand())
    assert r.dtype == torch.float64
    assert r.item() == pytest.approx(16 / 55, rel=1e-12)


def test_hf_ratio_is_batched_per_image():
    x = torch.cat([hand(), torch.ones(1, 3, 2)])
    assert hf_energy_ratio(x).tolist() == pytest.approx([16 / 55, 0.0], abs=1e-15)


@pytest.mark.parametrize("metric", ["hf", "erank", "srank", "fro", "l1inf"])
def test_size_weighting_equals_duplicating_a_token(metric):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    size = torch.tensor([[1.0, 2.0, 1.0, 1.0], [3.0, 1.0, 1.0, 1.0]])
    weighted = all_metrics(x, size)[metric]
    for b in (0, 1):
        reps = size[b].long()
        duplicated = x[b : b + 1].repeat_interleave(reps, dim=1)
        assert duplicated.shape[1] == int(size[b].sum())
        expected = all_metrics(duplicated)[metric]
        assert weighted[b].item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-12)
    # ... and the weighting matters: ignoring the sizes gives another value.
    assert not torch.allclose(weighted, all_metrics(x)[metric])


def test_prefix_and_empty_slots_contribute_nothing():
    x = hand()
    garbage = torch.tensor([[[100.0, -50.0]]])
    with_extra = torch.cat([garbage, x, 7 * garbage], dim=1)
    size = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    got = all_metrics(with_extra, size, num_prefix=1)
    ref = all_metrics(x)
    for k in ref:
        assert got[k].item() == pytest.approx(ref[k].item(), rel=1e-12), k


def test_no_patch_tokens_gives_zeros():
    x = torch.randn(2, 3, 4)
    for name, v in all_metrics(x, num_prefix=3).items():
        assert torch.equal(v, torch.zeros(2, dtype=torch.float64)), name
    for name, v in all_metrics(x, size=torch.zeros(2, 3)).items():
        assert torch.equal(v, torch.zeros(2, dtype=torch.float64)), name


def test_effective_rank_of_identity_and_rank_one():
    assert effective_rank(torch.eye(5)[None]).item() == pytest.approx(5.0, abs=1e-6)
    u, v = torch.randn(8, 1, dtype=torch.float64), torch.randn(1, 6, dtype=torch.float64)
    assert effective_rank((u @ v)[None]).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("tokens", [197, 60, 1])
def test_singular_values_from_the_gram_matrix_match_an_svd(tokens):
    """Tokens like a ViT's (a large shared component, a decaying spectrum), more or fewer
    tokens than channels or none, with sizes: the Gram route gives the SVD's values and ranks."""
    from bench.measure.spectral_metrics import _weighted_singular_values, ranks

    g = torch.Generator().manual_seed(3)
    c = 48
    x = 5 * torch.randn(4, 1, c, generator=g) + torch.randn(4, tokens, c, generator=g) @ torch.diag(
        torch.logspace(0, -4, c)
    )
    size = torch.randint(1, 5, (4, tokens), generator=g).float()
    sv = _weighted_singular_values(x, size, 1)
    xp = x[:, 1:].double() * size[:, 1:].double().sqrt()[..., None]
    exact = torch.linalg.svdvals(xp)
    n = exact.shape[-1]
    assert sv.shape == (4, c) and torch.all(sv[:, n:] == 0)
    # a tiny value's error grows as eps·σ_max²/σ: here (σ_max/σ_min ≈ 4e5) about 3e-12 of σ_max
    assert torch.allclose(sv[:, :n], exact, rtol=0, atol=1e-10 * (exact.max().item() if n else 1.0))
    erank, srank = ranks(x, size, 1)
    p = exact / exact.sum(-1, keepdim=True).clamp_min(1e-300)
    want_erank = torch.exp(-(p * p.clamp_min(1e-300).log()).sum(-1)) if n else torch.zeros(4)
    assert torch.allclose(erank, want_erank.double(), rtol=1e-9)
    if n:
        assert torch.allclose(srank, exact.square().sum(-1) / exact[:, 0].square(), rtol=1e-9)


def test_effective_rank_normalises_singular_values_not_their_squares():
    # σ = (3, 1): p = (3/4, 1/4) under L1 normalisation (σ²-normalisation would give 9/10, 1/10).
    x = torch.tensor([[[3.0, 0.0], [0.0, 1.0]]])
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert effective_rank(x).item() == pytest.approx(expected, rel=1e-12)


def test_effective_and_stable_rank_of_zero_tokens_are_zero():
    z = torch.zeros(1, 4, 3)
    assert effective_rank(z).item() == 0.0
    assert stable_rank(z).item() == 0.0


@pytest.mark.parametrize("n", [1, 3, 7])
def test_stable_rank_of_identity(n):
    assert stable_rank(torch.eye(n)[None]).item() == pytest.approx(float(n), rel=1e-12)


def test_stable_rank_hand_computed():
    # σ = (3, 1): (9 + 1) / 9.
    assert stable_rank(torch.tensor([[[3.0, 0.0], [0.0, 1.0]]])).item() == pytest.approx(10 / 9, rel=1e-12)


def test_residual_is_zero_for_identical_tokens():
    x = torch.randn(3, 1, 5).expand(3, 6, 5).contiguous() + 2.0
    res = rank_collapse_residual(x)
    assert set(res) == {"fro", "l1inf"}
    for v in res.values():
        assert v.shape == (3,)
        assert torch.equal(v, torch.zeros(3, dtype=torch.float64))


def test_residual_hand_computed():
    res = rank_collapse_residual(hand())
    assert res["l1inf"].item() == pytest.approx(math.sqrt(4 * 4) / math.sqrt(9 * 7), rel=1e-12)
    assert res["fro"].item() == pytest.approx(math.sqrt(16 / 55), rel=1e-12)


def test_residual_of_zero_tokens_is_zero_not_nan():
    res = rank_collapse_residual(torch.zeros(1, 3, 2))
    assert res["fro"].item() == 0.0 and res["l1inf"].item() == 0.0


# -- scatter to grid ---------------------------------------------------------------------------


def test_scatter_with_identity_source_reproduces_the_grid_exactly():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2 + 12, 5, generator=g)
    state = initial_state(x, num_prefix=2, patch_grid=(3, 4), trace_source=True)
    out = scatter_to_grid(x, state.source, 2, (3, 4))
    expected = x[:, 2:].transpose(1, 2).reshape(2, 5, 3, 4)
    assert out.dtype == x.dtype
    assert torch.equal(out, expected)
    # Row-major: patch p sits at (p // W, p % W).
    assert torch.equal(out[:, :, 1, 2], x[:, 2 + 1 * 4 + 2])


def test_scatter_fills_every_patch_a_merged_token_covers():
    # 1 prefix + 3 tokens over a 2x2 grid: token 0 covers patches 0 and 3, token 1 patch 1,
    # token 2 patch 2.
    x = torch.tensor([[[9.0, 9.0], [1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    source = torch.zeros(1, 4, 4)
    source[0, 1, [0, 3]] = 1.0
    source[0, 2, 1] = 1.0
    source[0, 3, 2] = 1.0
    out = scatter_to_grid(x, source, 1, (2, 2))
    assert out[0, :, 0, 0].tolist() == [1.0, 2.0]
    assert out[0, :, 1, 1].tolist() == [1.0, 2.0]
    assert out[0, :, 0, 1].tolist() == [3.0, 4.0]
    assert out[0, :, 1, 0].tolist() == [5.0, 6.0]


def test_scatter_leaves_pruned_patches_zero():
    x = torch.tensor([[[9.0], [1.0], [2.0]]])  # prefix + 2 surviving tokens of a 2x2 grid
    source = torch.zeros(1, 3, 4)
    source[0, 1, 0] = 1.0
    source[0, 2, 3] = 1.0
    out = scatter_to_grid(x, source, 1, (2, 2))
    assert out[0, 0].tolist() == [[1.0, 0.0], [0.0, 2.0]]


# -- radial spectrum ---------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(8, 8), (6, 10), (14, 14)])
@pytest.mark.parametrize("num_bands", [1, 3, 5])
def test_constant_grid_has_all_power_in_band_zero(grid, num_bands):
    t = torch.full((2, 3, *grid), 2.5)
    spec = radial_power_spectrum(t, num_bands)
    assert spec.shape == (2, num_bands) and spec.dtype == torch.float64
    assert not spec.isnan().any()
    assert (spec[:, 0] > 0).all()
    assert (spec[:, 1:] < 1e-12 * spec[:, :1]).all()


@pytest.mark.parametrize("grid", [(8, 8), (14, 14), (4, 6)])
def test_checkerboard_has_its_power_in_the_last_band(grid):
    h, w = grid
    r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    t = ((-1.0) ** (r + c)).expand(1, 2, h, w)
    spec = radial_power_spectrum(t, 4)
    assert spec[0, -1] > 0
    assert (spec[0, :-1] < 1e-12 * spec[0, -1]).all()


def test_band_power_is_the_mean_over_bins_and_parseval_holds():
    g = torch.Generator().manual_seed(5)
    t = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    spec = radial_power_spectrum(t, 1)  # one band: mean power over all 64 bins
    energy = t.square().sum() / 4  # per channel, averaged over channels (orthonormal FFT)
    assert spec.item() == pytest.approx(energy.item() / 64, rel=1e-12)


def test_bands_without_bins_are_nan():
    spec = radial_power_spectrum(torch.randn(1, 1, 2, 2), 8)
    # 2x2 grid: radii 0, 0.5, 0.5, √0.5; only bands 0, 5 and 7 of 8 hold bins.
    assert spec[0].isnan().tolist() == [False, True, True, True, True, False, True, False]


def test_relative_band_power_guards_zero_reference():
    rel = relative_band_power(torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[2.0, 0.0, 0.0]]))
    assert rel[0, 0].item() == 0.5
    assert rel[0, 1:].isnan().all()
    assert not rel.isinf().any()


# -- what each reducer removes -----------------------------------------------------------------


def test_std_score_is_zero_for_a_column_of_constant_attention():
    a = torch.tensor([[0.5, 0.2, 0.3], [0.5, 0.4, 0.1], [0.5, 0.3, 0.2]], dtype=torch.float64)[None, None]
    s = std_score(a)
    assert s.shape == (1, 3)
    assert s[0, 0].item() == pytest.approx(0.0, abs=1e-15)
    # Column 1: 0.2, 0.4, 0.3 around 0.3 -> √(0.01 + 0.01 + 0).
    assert s[0, 1].item() == pytest.approx(math.sqrt(0.02), rel=1e-9)


def test_std_score_averages_heads_and_skips_invalid_queries():
    a = torch.zeros(1, 2, 3, 3)
    a[0, 0, :, 0] = torch.tensor([1.0, 0.0, 0.0])  # head 0: deviations (2/3, -1/3, -1/3)
    a[0, 1, :, 0] = torch.tensor([0.0, 0.0, 5.0])  # query 2 is an empty slot below
    s = std_score(a)
    h0 = math.sqrt(4 / 9 + 1 / 9 + 1 / 9)
    h1 = math.sqrt(2 * (5 / 3) ** 2 + (10 / 3) ** 2)
    assert s[0, 0].item() == pytest.approx((h0 + h1) / 2, rel=1e-12)
    masked = std_score(a, valid=torch.tensor([[True, True, False]]))
    assert masked[0, 0].item() == pytest.approx(math.sqrt(0.5) / 2, rel=1e-12)


def naive_std(attn, b, k, valid=None):
    heads, n = attn.shape[1], attn.shape[2]
    qs = [q for q in range(n) if valid is None or bool(valid[b, q])]
    total = 0.0
    for h in range(heads):
        col = [float(attn[b, h, q, k]) for q in qs]
        m = sum(col) / len(col)
        total += math.sqrt(sum((v - m) ** 2 for v in col))
    return total / heads


def test_removed_vs_kept_on_a_constructed_case():
    g = torch.Generator().manual_seed(7)
    attn = torch.rand(2, 3, 6, 6, generator=g).softmax(dim=-1)
    attn[:, :, :, 0] *= 50  # a wildly varying prefix column: must not enter either mean
    kept = torch.tensor([[True, True, False, True, False, False], [False, False, True, True, True, True]])
    out = removed_vs_kept_score(attn, kept, num_prefix=1)
    assert set(out) == {"removed", "kept"}
    for b, (rem, kep) in enumerate((([2, 4, 5], [1, 3]), ([1], [2, 3, 4, 5]))):
        assert out["removed"][b].item() == pytest.approx(sum(naive_std(attn, b, k) for k in rem) / len(rem))
        assert out["kept"][b].item() == pytest.approx(sum(naive_std(attn, b, k) for k in kep) / len(kep))


def test_removed_vs_kept_ranks_a_high_frequency_removal():
    # Token 1 is attended by one query only (high frequency), token 2 uniformly (score 0).
    attn = torch.zeros(1, 1, 4, 4)
    attn[0, 0, :, 2] = 0.5
    attn[0, 0, 0, 1] = 0.5
    attn[0, 0, 1:, 3] = 0.5
    attn[0, 0, 0, 0] = 0.0
    out = removed_vs_kept_score(attn, torch.tensor([[True, False, True, True]]), num_prefix=1)
    assert out["removed"].item() == pytest.approx(naive_std(attn, 0, 1))
    assert out["removed"].item() > out["kept"].item() > 0


def test_removed_vs_kept_empty_set_is_nan_and_invalid_tokens_are_excluded():
    attn = torch.rand(1, 2, 4, 4).softmax(-1)
    all_kept = removed_vs_kept_score(attn, torch.ones(1, 4, dtype=torch.bool), num_prefix=1)
    assert all_kept["removed"].isnan().all() and not all_kept["kept"].isnan().any()
    valid = torch.tensor([[True, True, True, False]])
    out = removed_vs_kept_score(attn, torch.tensor([[True, True, False, False]]), num_prefix=1, valid=valid)
    assert out["removed"].item() == pytest.approx(naive_std(attn, 0, 2, valid))
    assert out["kept"].item() == pytest.approx(naive_std(attn, 0, 1, valid))


def toy_state(n_patches=4, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1 + n_patches, c, generator=g)
    return initial_state(x, num_prefix=1, patch_grid=(2, n_patches // 2), trace_source=True)


def test_untouched_mask_finds_kept_tokens_and_not_merged_ones():
    before = toy_state()
    kept = keep_tokens(before, torch.tensor([[0, 1, 3], [0, 2, 3]]))
    merged_x = (before.x[:, [2]] + before.x[:, [4]]) / 2
    after = kept.replace(
        x=torch.cat([kept.x, merged_x], dim=1),
        size=torch.cat([kept.size, torch.full((2, 1), 2.0)], dim=1),
        pos=torch.cat([kept.pos, torch.full((2, 1), -1)], dim=1),
        source=None,
    )
    mask = untouched_mask(before, after)
    assert mask.tolist() == [[False, True, False, True, False], [False, False, True, True, False]]


def test_untouched_mask_when_positions_are_lost_and_values_change():
    before = toy_state()
    # ToMe's merge_all sets every position to -1: matching falls back to value and size.
    after = before.replace(pos=torch.full_like(before.pos, -1))
    assert untouched_mask(before, after)[:, 1:].all()
    # A token whose value changed beyond rounding, or whose size changed, is not untouched.
    x = before.x.clone()
    x[0, 2, 1] *= 1 + 1e-5
    size = before.size.clone()
    size[1, 3] = 2.0
    mask = untouched_mask(before, after.replace(x=x, size=size))
    assert mask.tolist() == [[False, True, False, True, True], [False, True, True, False, True]]
    # A matching value at a different known position is not a match either.
    swapped = before.replace(pos=before.pos[:, [0, 2, 1, 3, 4]])
    assert untouched_mask(before, swapped).tolist() == [[False, False, False, True, True]] * 2


def test_untouched_mask_tolerates_the_rounding_of_recomputed_means():
    before = toy_state(n_patches=64, c=16)
    before = before.replace(size=torch.full_like(before.size, 3.0))
    # merge_all recomputes an unmerged token of size 3 as (3x)/3, which can change the last bit.
    recomputed = (before.x * 3.0) / 3.0
    assert not torch.equal(recomputed, before.x)  # the case is real for these values
    assert untouched_mask(before, before.replace(x=recomputed))[:, 1:].all()
    # With source maps, a token covering other patches is no match even with the same value.
    source = before.source.clone()
    source[0, 1, 5] = 1.0
    mask = untouched_mask(before, before.replace(source=source))
    assert not mask[0, 1] and mask[0, 2:].all() and mask[1, 1:].all()


def test_untouched_mask_ignores_empty_slots_and_prefix():
    before = toy_state()
    size = before.size.clone()
    size[:, 4] = 0.0
    before = before.replace(size=size)
    mask = untouched_mask(before, before)
    assert mask.tolist() == [[False, True, True, True, False]] * 2


# -- on real reductions --------------------------------------------------------------------------


def source_truth(before: TokenState, after: TokenState):
    """Ground truth from the source maps: a before token is untouched iff some after token
    covers exactly the same patches (only valid when the tokens really are copies)."""
    sb = before.source[:, before.num_prefix :]
    sa = after.source[:, after.num_prefix :]
    same = (sb[:, :, None, :] == sa[:, None, :, :]).all(-1).any(-1)
    return same & (before.size[:, before.num_prefix :] > 0)


@pytest.mark.parametrize(
    "method,kw",
    [("tome", {"r": 6}), ("evit", {"blocks": (1, 3), "keep_rate": 0.6}), ("evit", {"blocks": (2,), "fuse": False})],
)
def test_metrics_on_real_reduction_steps(method, kw, images):
    model = tiny_vit()
    _, steps, _ = run_capturing(model, build_reducer(method, **kw), images)
    assert steps
    for i, (_, before, after) in enumerate(steps):
        mask = untouched_mask(before, after)
        assert mask.shape == before.size.shape
        assert torch.equal(mask[:, before.num_prefix :], source_truth(before, after))
        # Without the source maps the heuristic (value, size, position) finds the same tokens.
        blind = untouched_mask(before.replace(source=None), after.replace(source=None))
        assert torch.equal(blind, mask)
        assert (mask.sum(-1) <= after.num_tokens - after.num_prefix).all()
        if method == "evit":  # EViT copies the kept tokens exactly and appends one fused token
            fused = 1 if kw.get("fuse", True) else 0
            assert (mask.sum(-1) == after.num_tokens - after.num_prefix - fused).all()
        grid = before.patch_grid
        if i == 0:  # nothing reduced yet: the source is the identity on the patches
            painted = scatter_to_grid(before.x, before.source, before.num_prefix, grid)
            expected = before.x[:, before.num_prefix :].transpose(1, 2).reshape(painted.shape)
            assert torch.equal(painted, expected)
        ref = radial_power_spectrum(scatter_to_grid(before.x, before.source, before.num_prefix, grid), 4)
        red = radial_power_spectrum(scatter_to_grid(after.x, after.source, after.num_prefix, grid), 4)
        assert torch.isfinite(relative_band_power(red, ref)).all()
        for fn in (hf_energy_ratio, effective_rank, stable_rank):
            for s in (before, after):
                v = fn(s.x, s.size, s.num_prefix)
                assert v.shape == (images.shape[0],) and torch.isfinite(v).all()


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_eigenvalues_split_over_threads_equal_a_one_thread_solve(batch):
    from bench.measure.spectral_metrics import _eigvalsh

    g = torch.Generator().manual_seed(5)
    a = torch.randn(batch, 40, 24, generator=g, dtype=torch.float64)
    gram = a.mT @ a
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = torch.linalg.eigvalsh(gram)
    finally:
        torch.set_num_threads(threads)
    torch.set_num_threads(2)
    try:
        assert torch.equal(_eigvalsh(gram), one)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
