"""FATR on tiny random ViTs: HF copies, DC means, scores, attention re-weighting."""

from __future__ import annotations

import pytest
import torch
from conftest import build_reducer, tiny_vit
from helpers import run_capturing

from bench.errors import BenchError
from fatr import hf_scores
from fatr.dc import window_of
from fatr.reducer import DC_GRID, DC_SLOTS
from methods import ReducerConfigError, apply_reducer
from methods.attention import attention_forward
from methods.base import AttentionReweight

CONFIGS = [
    {"blocks": [1, 3, 4]},
    {"blocks": [1, 3, 4], "score": "abs", "dc_grid": 1},
    {"blocks": [0, 2, 4], "score": "std", "dc_grid": [4, 2, 1], "keep_rate": [0.8, 0.6, 0.5]},
]


def _check_step(before, after, keep_rate):
    p = before.num_prefix
    d_prev = before.extra.get(DC_SLOTS, 0)
    w = after.extra[DC_GRID]
    d = after.extra[DC_SLOTS]
    assert d == w * w
    assert torch.equal(after.x[:, :p], before.x[:, :p])
    hf_x, hf_pos = after.x[:, p + d :], after.pos[:, p + d :]
    for b in range(before.x.shape[0]):
        src_index = {int(q): j for j, q in enumerate(before.pos[b].tolist()) if q >= 0}
        # HF tokens are bit-identical copies of input tokens
        for i, q in enumerate(hf_pos[b].tolist()):
            assert torch.equal(hf_x[b, i], before.x[b, src_index[q]])
        kept = set(hf_pos[b].tolist())
        lf = [j for j in range(p + d_prev, before.num_tokens) if int(before.pos[b, j]) not in kept]
        # each DC token = size-weighted mean of exactly its window's LF tokens and earlier DC tokens
        for win in range(d):
            members = [j for j in lf if int(window_of(before.pos[b, j], before.patch_grid, w)) == win]
            if d_prev:
                wp = before.extra[DC_GRID]
                members += [p + k for k in range(d_prev) if (k // wp) * w // wp * w + (k % wp) * w // wp == win]
            sizes = before.size[b, members]
            if sizes.sum() == 0:
                assert after.size[b, p + win] == 0
                continue
            expect = (before.x[b, members] * sizes[:, None]).sum(0) / sizes.sum()
            assert torch.allclose(after.x[b, p + win], expect, atol=1e-5)
            assert after.size[b, p + win] == sizes.sum()
    assert torch.equal(after.size[:, p:].sum(1), before.size[:, p:].sum(1)), "sizes not conserved"


@pytest.mark.parametrize("cfg", CONFIGS)
def test_fatr_step_properties(cfg, images):
    model = tiny_vit()
    reducer = build_reducer("fatr", **cfg)
    logits, steps, ctx = run_capturing(model, reducer, images)
    assert torch.isfinite(logits).all()
    assert ctx.token_trace == [o for _, o in reducer.token_counts(1, 64, 6)]
    assert len(steps) == 3
    for _, before, after in steps:
        _check_step(before, after, cfg.get("keep_rate", 0.7))
        cover = after.source[:, 1:].sum(1)
        assert torch.all(cover == 1), "source map must partition the grid"


def _slow_scores(attn, valid, variant):
    b_, h_, n_, _ = attn.shape
    out = torch.zeros(b_, n_)
    for b in range(b_):
        qs = [q for q in range(n_) if valid[b, q]]
        n = len(qs)
        for k in range(n_):
            per_head = []
            for h in range(h_):
                col = [float(attn[b, h, q, k]) for q in qs]
                if variant == "signed":
                    per_head.append(sum(c - 1 / n for c in col) / n)
                elif variant == "abs":
                    per_head.append(sum(abs(c - 1 / n) for c in col) / n)
                else:
                    m = sum(col) / n
                    per_head.append(sum((c - m) ** 2 for c in col) ** 0.5)
            out[b, k] = sum(per_head) / h_
    return out


@pytest.mark.parametrize("variant", ["signed", "abs", "std"])
def test_scores_match_slow_reference(variant):
    g = torch.Generator().manual_seed(0)
    attn = torch.randn(2, 3, 7, 7, generator=g).softmax(-1)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 2] = False
    attn[1, :, :, 2] = 0
    attn[1] = attn[1] / attn[1].sum(-1, keepdim=True)
    assert torch.allclose(hf_scores(attn, variant, valid), _slow_scores(attn, valid, variant), atol=1e-6)


def test_std_score_is_zero_for_constant_attention_column():
    attn = torch.randn(1, 2, 5, 5).softmax(-1)
    attn[..., 3] = 0.2
    assert hf_scores(attn, "std")[0, 3].abs() < 1e-7
    with pytest.raises(ValueError, match="choose one of"):
        hf_scores(attn, "loud")


def _attn_module(h=3, c=24):
    from timm.layers import Attention

    torch.manual_seed(0)
    return Attention(c, num_heads=h, qkv_bias=True).eval()


def test_legacy_logit_form_equals_explicit_a_hat_v():
    """omega2_form=logit: ω2 as a logit bias on DC columns, ω1 on the high-pass part of all columns."""
    attn = _attn_module()
    x = torch.randn(2, 9, 24)
    size = torch.rand(2, 9) * 3 + 0.5
    size[1, 4] = 0  # an empty DC slot
    valid = size > 0
    bias = size.log()[:, None, None, :]
    bias[:, :, :, 1:3] += torch.tensor(1.7).log()  # DC columns scaled by 1 + ω2
    rw = AttentionReweight(hp_gain=torch.tensor([0.5, -0.3, 1.2]))
    fused, _ = attention_forward(attn, x, bias, rw, valid, frozenset())
    explicit, taps = attention_forward(attn, x, bias, rw, valid, frozenset({"attn"}))
    # by hand: A = softmax(logits + bias); Â = A_LP + (1+ω)(A - A_LP); out = proj(Â V)
    q, k, v = attn.qkv(x).reshape(2, 9, 3, 3, 8).permute(2, 0, 3, 1, 4)
    a = ((q * attn.scale) @ k.transpose(-2, -1) + bias).softmax(-1)
    lp = (valid.float() / valid.sum(-1, keepdim=True))[:, None, None, :]
    a_hat = lp + (1 + rw.hp_gain[None, :, None, None]) * (a - lp)
    assert torch.allclose(a_hat.sum(-1), torch.ones(2, 3, 9), atol=1e-6), "rows of Â must sum to 1"
    by_hand = attn.proj((a_hat @ v).transpose(1, 2).reshape(2, 9, 24))
    assert torch.allclose(fused, by_hand, atol=1e-5)
    assert torch.allclose(explicit, by_hand, atol=1e-5)
    assert torch.allclose(taps["attn"], a, atol=1e-6), "the tap is the attention A the reducer scores"


def test_omega_zero_equals_plain_proportional_attention(images):
    model = tiny_vit()
    cfg = {"blocks": [1, 3], "dc_grid": [2, 1], "prop_attn": True}
    with torch.no_grad():
        apply_reducer(model, build_reducer("fatr", **cfg))
        plain = model(images)
    reducer = build_reducer("fatr", **cfg)
    apply_reducer(model, reducer)
    reducer.omega1.requires_grad_(True)  # forces the re-weighting path with ω = 0
    forced = model(images)
    assert reducer._learned_active()
    assert torch.allclose(forced, plain, atol=1e-5)


def test_logit_omega2_scales_attention_paid_to_dc_tokens(images):
    model = tiny_vit()
    reducer = build_reducer("fatr", blocks=[1, 3], dc_grid=[2, 1], omega2_form="logit", prop_attn=True)
    _, steps0, _ = run_capturing(model, reducer, images)
    with torch.no_grad():
        reducer.omega2[3] = 1.0  # DC columns x2 at block 3 (before the softmax renormalises)
    _, steps1, _ = run_capturing(model, reducer, images)
    a0, a1 = steps0[1][1].attn, steps1[1][1].attn  # block 3, before its reduction
    d = steps0[0][2].extra[DC_SLOTS]
    dc = slice(1, 1 + d)
    ratio0 = a0[..., dc] / a0[..., -1:]
    ratio1 = a1[..., dc] / a1[..., -1:]
    assert torch.allclose(ratio1, 2 * ratio0, rtol=1e-4)


def test_fatr_errors():
    with pytest.raises(BenchError, match="choose one of"):
        build_reducer("fatr", score="loud")
    with pytest.raises(BenchError, match="does not nest"):
        build_reducer("fatr", dc_grid=[2, 3, 1])
    with pytest.raises(ReducerConfigError, match="finer than"):
        apply_reducer(tiny_vit(), build_reducer("fatr", blocks=[1], dc_grid=16))
    with pytest.raises(ReducerConfigError, match="omega file not found"):
        apply_reducer(tiny_vit(), build_reducer("fatr", blocks=[1], dc_grid=2, omega_path="/nonexistent.pt"))


def test_fatr_patches_a_weightless_model():
    """The sweep checks a run's reducer on the model built on the meta device (no weights):
    FATR binds there, and ω, which has no values there, counts as not learned."""
    import timm

    from fatr import FATR

    with torch.device("meta"):
        model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    reducer = FATR(keep_rate=0.7)
    apply_reducer(model, reducer)
    assert not reducer.refresh_learned()


def test_an_omega_file_fitted_at_another_keep_rate_is_one_note_not_a_warning_per_budget_step(tmp_path):
    """Budget matching binds FATR once per bisection step, and each bind loads the ω file: the
    difference from the file's fitting settings was a warning per step. The search is silent
    now; the solved reducer says it when applied, and holds it as a note (which the harness
    prints and records, instead of the warning)."""
    import warnings

    from bench.budget import match_budget
    from bench.measure.flops import VitShape
    from fatr import FATR
    from methods.patch import model_info

    model = tiny_vit()
    fitted = FATR(blocks=[1], dc_grid=2, keep_rate=0.7)
    apply_reducer(model, fitted)
    torch.save({**fitted.state_dict(), "meta": {"keep_rate": 0.7}}, tmp_path / "omega.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning during budget matching fails the test
        asked = FATR(blocks=[1], dc_grid=2, omega_path=str(tmp_path / "omega.pt"))
        solved = match_budget(asked, 0.8, VitShape.of(model), model_info(model)).reducer
    with pytest.warns(UserWarning, match="was fitted with keep_rate=0.7000") as said:
        apply_reducer(tiny_vit(), solved)
    assert len(said) == 1 and solved.hparams["keep_rate"] != 0.7
    assert solved.notes() == [
        f"omega file {tmp_path / 'omega.pt'} was fitted with keep_rate=0.7000; "
        f"this FATR uses keep_rate={solved.hparams['keep_rate']:.4f}"
    ]
    with pytest.warns(UserWarning, match="was fitted with keep_rate=0.7000"):  # loaded by hand: still a warning
        solved.load_omega(tmp_path / "omega.pt")
