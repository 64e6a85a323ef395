"""FATR as the paper specifies it: post-softmax ω per head, DC positional term, SVD score, DC weights."""

from __future__ import annotations

import pytest
import torch
from bench_utils import compose
from conftest import build_reducer, tiny_vit
from helpers import run_capturing

from bench.errors import BenchError
from fatr import FATR
from fatr.reducer import DC_EMPTY, attention_received
from fatr.scores import high_pass, svd_scores, top_left_subspace
from methods import ReducerConfigError, apply_reducer
from methods.attention import attention_forward, fused_reweighted, reweight_probs
from methods.base import AttentionReweight


def _random_attention_inputs(seed=0, b=2, h=3, n=11, d=8, span=(1, 5)):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    size = torch.rand(b, n, generator=g) * 3 + 0.5
    size[1, span[0] + 1] = 0  # an empty DC slot
    valid = size > 0
    bias = torch.zeros(b, 1, 1, n).masked_fill(~valid[:, None, None, :], float("-inf"))
    rw = AttentionReweight(hp_gain=torch.randn(h, generator=g), span=span, span_gain=torch.randn(h, generator=g))
    return q, k, v, bias, valid, rw


def _formula(q, k, v, bias, valid, rw):
    """Â = A_LP' + (1+ω1)·A_HP' + (1+ω2)·A^DC, written out element by element."""
    a = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 + bias).softmax(-1)
    b, h, n, _ = a.shape
    a_hat = torch.zeros_like(a)
    for bi in range(b):
        count = int(valid[bi].sum())
        for hi in range(h):
            w1, w2 = float(rw.hp_gain[hi]), float(rw.span_gain[hi])
            for j in range(n):
                col = a[bi, hi, :, j]
                if rw.span[0] <= j < rw.span[1]:
                    a_hat[bi, hi, :, j] = (1 + w2) * col
                elif valid[bi, j]:
                    a_hat[bi, hi, :, j] = 1 / count + (1 + w1) * (col - 1 / count)
    return a, a_hat, a_hat @ v


def test_fused_paper_reweighting_matches_the_formula():
    q, k, v, bias, valid, rw = _random_attention_inputs()
    a, a_hat, expect = _formula(q, k, v, bias, valid, rw)
    fused = fused_reweighted(q, k, v, bias, rw, valid, q.shape[-1] ** -0.5)
    assert (fused - expect).abs().max() < 1e-5
    assert (reweight_probs(a, rw, valid) - a_hat).abs().max() < 1e-6
    # the DC columns are scaled after the softmax, and rows are not renormalised
    assert not torch.allclose(a_hat.sum(-1), torch.ones_like(a_hat.sum(-1)), atol=1e-3)


def test_zero_omega_is_exactly_unweighted_attention():
    q, k, v, bias, valid, rw = _random_attention_inputs(seed=3)
    zero = AttentionReweight(hp_gain=torch.zeros(3), span=rw.span, span_gain=torch.zeros(3))
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert (fused_reweighted(q, k, v, bias, zero, valid, q.shape[-1] ** -0.5) - plain).abs().max() < 1e-6
    a = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 + bias).softmax(-1)
    assert torch.equal(reweight_probs(a, zero, valid), a)


def test_explicit_and_fused_paths_of_a_block_agree():
    from timm.layers import Attention

    torch.manual_seed(0)
    attn = Attention(24, num_heads=3, qkv_bias=True).eval()
    x = torch.randn(2, 11, 24)
    _, _, _, bias, valid, rw = _random_attention_inputs()
    fused, _ = attention_forward(attn, x, bias, rw, valid, frozenset())
    explicit, taps = attention_forward(attn, x, bias, rw, valid, frozenset({"attn"}))
    assert (fused - explicit).abs().max() < 1e-5
    assert torch.allclose(taps["attn"].sum(-1), torch.ones(2, 3, 11), atol=1e-5), "the tap is A, not Â"


def test_paper_defaults_in_the_method_config():
    cfg = compose(["method=fatr"]).method.reducer
    assert list(cfg.dc_grid) == [2, 1, 1] and cfg.prop_attn is False
    assert cfg.omega2_form == "post_softmax" and cfg.score == "signed" and list(cfg.blocks) == [3, 6, 9]
    reducer = FATR()
    assert reducer.dc_grids == {3: 2, 6: 1, 9: 1} and not reducer.proportional_attention
    counts = reducer.token_counts(1, 196, 12)
    assert [o for _, o in counts][3:10:3] == [1 + 4 + 138, 1 + 1 + 97, 1 + 1 + 68]


def _trained_looking(reducer: FATR, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        reducer.omega1.copy_(torch.randn(reducer.omega1.shape, generator=g) * 0.3)
        reducer.omega2.copy_(torch.randn(reducer.omega2.shape, generator=g) * 0.3)
        for p in reducer.dc_pos.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_omega_and_dc_pos_are_per_head_parameters_that_get_gradients(images):
    model = tiny_vit()
    reducer = FATR(blocks=[1, 3], dc_grid=[2, 1])
    apply_reducer(model, reducer)
    assert reducer.omega1.shape == (6, 3) and reducer.omega2.shape == (6, 3)
    assert {k: tuple(v.shape) for k, v in reducer.dc_pos.items()} == {"1": (4, 48), "3": (1, 48)}
    names = {n for n, _ in model.named_parameters() if n.startswith("token_reducer.")}
    assert names == {"token_reducer.omega1", "token_reducer.omega2", "token_reducer.dc_pos.1", "token_reducer.dc_pos.3"}
    model.zero_grad()
    model(images).square().sum().backward()
    g1, g2 = reducer.omega1.grad, reducer.omega2.grad
    assert g1[2:].abs().sum() > 0 and g2[2:].abs().sum() > 0, "ω acts in every block after the first reduction"
    assert g1[:2].abs().sum() == 0, "no DC tokens before the first reduction, so no re-weighting there"
    assert all(p.grad.abs().sum() > 0 for p in reducer.dc_pos.values())


def test_zero_parameters_leave_the_model_unchanged_and_nonzero_ones_change_it(images):
    model = tiny_vit()
    reducer = FATR(blocks=[1, 3], dc_grid=[2, 1])
    apply_reducer(model, reducer)
    with torch.no_grad():
        plain = model(images)
    for p in reducer.parameters():
        p.requires_grad_(True)  # forces the re-weighted path and the positional add with zeros
    forced = model(images)
    assert reducer._learned_active()
    assert (forced - plain).abs().max() < 1e-5
    _trained_looking(reducer)
    with torch.no_grad():
        assert (model(images) - plain).abs().max() > 1e-3


def test_state_dict_and_omega_file_round_trip(tmp_path, images):
    model = tiny_vit()
    reducer = FATR(blocks=[1, 3], dc_grid=[2, 1])
    apply_reducer(model, reducer)
    _trained_looking(reducer, seed=4)
    with torch.no_grad():
        trained = model(images)
    path = tmp_path / "fatr_state.pt"
    torch.save({**reducer.state_dict(), "meta": {"blocks": [1, 3]}}, path)
    fresh = FATR(blocks=[1, 3], dc_grid=[2, 1], omega_path=str(path))
    apply_reducer(model, fresh)
    with torch.no_grad():
        assert torch.equal(model(images), trained)
    again = FATR(blocks=[1, 3], dc_grid=[2, 1])
    apply_reducer(model, again)
    again.load_state_dict(reducer.state_dict())
    with torch.no_grad():
        assert torch.equal(model(images), trained)


def test_older_per_block_omega2_files_broadcast_to_every_head(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"omega1": torch.zeros(6, 3), "omega2": torch.arange(6.0), "meta": {}}, path)
    reducer = FATR(blocks=[1, 3], dc_grid=[2, 1], omega_path=str(path))
    apply_reducer(tiny_vit(), reducer)
    assert torch.equal(reducer.omega2, torch.arange(6.0)[:, None].expand(6, 3))


@pytest.mark.parametrize(
    "content,match",
    [(b"not a torch file", "cannot be read"), (None, "holds no omega1/omega2")],
)
def test_unreadable_omega_files_get_one_clear_error(tmp_path, content, match):
    path = tmp_path / "bad.pt"
    if content is None:
        torch.save({"something": torch.zeros(1)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ReducerConfigError, match=match):
        apply_reducer(tiny_vit(), FATR(blocks=[1], dc_grid=2, omega_path=str(path)))


def test_dc_pos_file_for_another_grid_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"omega1": torch.zeros(6, 3), "omega2": torch.zeros(6, 3), "dc_pos.1": torch.zeros(16, 48)}, path)
    with pytest.raises(ReducerConfigError, match="DC positional term for block 1"):
        apply_reducer(tiny_vit(), FATR(blocks=[1, 3], dc_grid=[2, 1], omega_path=str(path)))


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"omega2_form": "pre"}, "unknown omega2_form"),
        ({"dc_weight": "max"}, "unknown dc_weight"),
        ({"svd_rank": 0}, "svd_rank must be a positive integer"),
        ({"svd_iters": -1}, "svd_iters must be a non-negative integer"),
        ({"blocks": [1, 3]}, r"dc_grid has 3 values but there are 2 reduction blocks"),
    ],
)
def test_bad_fatr_settings(kw, match):
    with pytest.raises(BenchError, match=match):
        build_reducer("fatr", **kw)


def test_empty_dc_slots_are_masked_without_proportional_attention(images):
    model = tiny_vit()
    # 4x4 windows and keep 0.9: most windows have no low-frequency token at block 1
    reducer = FATR(blocks=[1, 3], dc_grid=[4, 2], keep_rate=0.9)
    _, steps, _ = run_capturing(model, reducer, images)
    after_first = steps[0][2]
    assert after_first.extra[DC_EMPTY]
    attn_next = steps[1][1].attn  # block 3, computed with the first reduction's DC slots
    empty = after_first.size == 0
    assert empty.any()
    assert attn_next.masked_select(empty[:, None, None, :].expand_as(attn_next)).abs().max() == 0


def _decaying_matrix(seed, n=40, decay=0.6):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(3, n, n, generator=g)).Q
    v = torch.linalg.qr(torch.randn(3, n, n, generator=g)).Q
    s = decay ** torch.arange(n, dtype=torch.float32)
    return u @ torch.diag_embed(s.expand(3, n)) @ v.transpose(-1, -2)


def test_power_iteration_converges_to_the_exact_svd_scores():
    m = _decaying_matrix(0)
    exact_u = top_left_subspace(m, 4, None)
    exact = (exact_u.transpose(-1, -2) @ m).square().sum(1)
    errors = []
    for iters in (0, 1, 2, 4, 8):
        u = top_left_subspace(m, 4, iters)
        approx = (u.transpose(-1, -2) @ m).square().sum(1)
        errors.append(float((approx - exact).abs().max() / exact.abs().max()))
    assert errors[-1] < 1e-4, errors
    assert all(a >= b - 1e-6 for a, b in zip(errors, errors[1:], strict=False)), f"not converging: {errors}"


def test_svd_scores_through_the_attention_api():
    a = _decaying_matrix(1).abs()[:, None].expand(3, 2, 40, 40)
    a = a / a.sum(-1, keepdim=True)
    exact = svd_scores(a, None, rank=1, iters=None)
    approx = svd_scores(a, None, rank=1, iters=30)
    assert (approx - exact).abs().max() < 1e-3 * exact.max()
    # full rank: the score is the whole column energy of A_HP
    full = svd_scores(a, None, rank=40, iters=None)
    assert torch.allclose(full, high_pass(a).square().sum(1), rtol=1e-4, atol=1e-8)


def test_svd_ranks_a_planted_high_frequency_token_first():
    g = torch.Generator().manual_seed(2)
    n = 30
    a = torch.full((2, 4, n, n), 1.0) + 0.05 * torch.rand(2, 4, n, n, generator=g)
    planted = 17
    a[..., ::2, planted] += 6.0  # half the queries attend strongly to token 17, half do not
    a = a / a.sum(-1, keepdim=True)
    for iters in (None, 2):
        scores = svd_scores(a, None, rank=2, iters=iters)
        assert (scores.argmax(-1) == planted).all()


def test_attention_weighted_dc_tokens(images):
    model = tiny_vit()
    reducer = FATR(blocks=[2], dc_grid=[1], keep_rate=0.5, dc_weight="attn")
    _, steps, _ = run_capturing(model, reducer, images)
    _, before, after = steps[0]
    p = before.num_prefix
    kept = set(after.pos[0, p + 1 :].tolist())
    lf = [j for j in range(p, before.num_tokens) if int(before.pos[0, j]) not in kept]
    recv = attention_received(before.attn, before.size > 0)[0]
    w = before.size[0, lf] * recv[lf]
    expect = (before.x[0, lf] * w[:, None]).sum(0) / w.sum()
    assert torch.allclose(after.x[0, p], expect, atol=1e-5)
    assert after.size[0, p] == len(lf), "a DC token's size counts patches whatever the weights"
    plain = (before.x[0, lf]).mean(0)
    assert not torch.allclose(after.x[0, p], plain, atol=1e-4)


def test_blocks_stay_fused_with_trained_omega(monkeypatch, images):
    import methods.attention as attention

    calls = []
    real = attention.F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_vit()
    reducer = FATR(blocks=[1, 3], dc_grid=[2, 1])
    apply_reducer(model, reducer)
    _trained_looking(reducer)
    with torch.no_grad():
        model(images)
    assert len(calls) == len(model.blocks) - 2


@pytest.mark.parametrize(
    "kw,trained",
    [({"score": "svd"}, False), ({}, True), ({"omega2_form": "logit", "prop_attn": True}, True)],
)
def test_fvcore_and_analytic_macs_agree_for_fatr_options(kw, trained):
    """The analytic count (budget matching) includes FATR's own matmuls and the re-weighting."""
    import timm

    from bench.measure.flops import VitShape, analytic_macs, fvcore_macs

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224").eval()
    reducer = FATR(**kw)
    apply_reducer(model, reducer)
    if trained:
        _trained_looking(reducer)
    counted = fvcore_macs(model, torch.randn(1, 3, 224, 224))
    analytic = analytic_macs(VitShape.of(model), reducer, 196)
    assert abs(counted / analytic - 1) < 0.01, (counted, analytic)
