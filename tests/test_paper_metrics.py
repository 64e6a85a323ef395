"""The FATR paper's frequency analysis: constructed feature maps with known answers, the
selection IoU against what EViT and FATR really keep, and the reference against timm."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_reducer, tiny_vit

from bench.errors import BenchError
from bench.measure.paper_metrics import (
    PARK_KIM_EPS,
    cosine_to_mean,
    diagonal_frequencies,
    diagonal_log_amplitude,
    keep_count,
    relative_log_amplitude,
    selection_iou,
    selection_sets,
    top_k_mask,
)
from bench.measure.spectral import block_statistics, spectral_metrics
from bench.measure.spectral_metrics import radial_power_spectrum, scatter_to_grid, untouched_mask
from bench.report.paper import mean_ci, paired_ci
from fatr.reducer import DC_SLOTS
from methods import ATTN, apply_reducer, reduction_context
from methods.identity import NoReduction

LOG_EPS = math.log(PARK_KIM_EPS)


def log_amp(a):
    return math.log(a + PARK_KIM_EPS)


def coords(n):
    return torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64), indexing="ij")


# -- Fourier analysis on constructed maps -------------------------------------------------------


@pytest.mark.parametrize("n", [8, 14])
def test_checkerboard_puts_its_energy_at_pi(n):
    r, c = coords(n)
    board = ((-1.0) ** (r + c)).expand(1, 3, n, n)
    prof = diagonal_log_amplitude(board)
    assert prof.shape == (1, n // 2 + 1) and prof.dtype == torch.float64
    assert prof[0, -1].item() == pytest.approx(log_amp(n * n), rel=1e-12)
    assert prof[0, :-1].tolist() == pytest.approx([LOG_EPS] * (n // 2), abs=1e-6)
    # On top of a constant, Δ log amplitude at π is exactly log(amplitude / offset).
    delta = relative_log_amplitude(diagonal_log_amplitude(2.0 + 0.5 * board))
    assert delta[0, 0].item() == 0.0
    assert delta[0, -1].item() == pytest.approx(math.log(0.25), abs=1e-6)


@pytest.mark.parametrize("n", [7, 8, 14])
def test_constant_map_has_no_energy_at_pi(n):
    prof = diagonal_log_amplitude(torch.full((2, 4, n, n), 2.5))
    assert prof[:, 0].tolist() == pytest.approx([log_amp(2.5 * n * n)] * 2, rel=1e-12)
    assert prof[:, 1:].flatten().tolist() == pytest.approx([LOG_EPS] * (2 * (n // 2)), abs=1e-6)
    assert (relative_log_amplitude(prof)[:, -1] < -15).all()


@pytest.mark.parametrize("n,k", [(14, 1), (14, 3), (14, 6), (9, 2)])
def test_diagonal_sinusoid_lands_in_its_own_bin(n, k):
    r, c = coords(n)
    wave = torch.cos(2 * math.pi * k * (r + c) / n)[None, None]
    prof = diagonal_log_amplitude(wave)[0]
    assert int(prof.argmax()) == k
    assert prof[k].item() == pytest.approx(log_amp(n * n / 2), rel=1e-9)
    others = [v for i, v in enumerate(prof.tolist()) if i != k]
    assert others == pytest.approx([LOG_EPS] * len(others), abs=1e-6)
    assert diagonal_frequencies(n)[k].item() == pytest.approx(2 * k / n)


@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_axis_sinusoid_lands_in_its_own_radial_band(k):
    # The radial power spectrum (all directions) puts cos(2π k·col / 14) in the band of radius k/14.
    n, bands = 14, 6
    _, c = coords(n)
    spec = radial_power_spectrum(torch.cos(2 * math.pi * k * c / n)[None, None], bands)[0]
    expected = int((k / n) / (math.sqrt(0.5) / bands))
    assert int(spec.nan_to_num(-1.0).argmax()) == expected
    assert (spec.nan_to_num(0.0)[torch.arange(bands) != expected] < 1e-20).all()


def test_log_is_taken_before_the_channel_mean():
    n = 8
    r, c = coords(n)
    board = (-1.0) ** (r + c)
    prof = diagonal_log_amplitude(torch.stack([board, 4 * board])[None])
    assert prof[0, -1].item() == pytest.approx((log_amp(64) + log_amp(256)) / 2, rel=1e-12)


def park_kim_profile(latent):
    """The reference notebook's recipe, written out for the test: log(|fft2| + 1e-6),
    spectrum rolled by h/2, mean over images and channels, half diagonal from the centre."""
    h = latent.shape[-1]
    f = (torch.fft.fft2(latent.double()).abs() + 1e-6).log()
    f = torch.roll(f, shifts=(h // 2, h // 2), dims=(2, 3)).mean(dim=(0, 1))
    return f.diag()[h // 2 :]


@pytest.mark.parametrize("n", [14, 15])
def test_matches_park_and_kim_and_adds_the_nyquist_bin_on_even_grids(n):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, n, n, generator=g, dtype=torch.float64) + 0.3
    ours = diagonal_log_amplitude(x).mean(dim=0)
    theirs = park_kim_profile(x)
    if n % 2 == 0:  # the notebook stops one bin short of π; ours ends exactly at π
        assert len(ours) == len(theirs) + 1
        assert torch.allclose(ours[:-1], theirs, rtol=0, atol=1e-12)
        assert diagonal_frequencies(n)[-1].item() == 1.0
    else:
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-12)
        assert diagonal_frequencies(n)[-1].item() == pytest.approx(1 - 1 / n)


def test_fourier_bad_input():
    with pytest.raises(ValueError, match="square patch grid, got 4x6"):
        diagonal_log_amplitude(torch.zeros(1, 2, 4, 6))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        diagonal_log_amplitude(torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="eps must be positive"):
        diagonal_log_amplitude(torch.zeros(1, 1, 4, 4), eps=0.0)


# -- over-smoothing -----------------------------------------------------------------------------


def test_cosine_to_mean_hand_computed_and_collapsed():
    x = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 1.0]]])  # prefix, then two orthogonal tokens
    assert cosine_to_mean(x, num_prefix=1).item() == pytest.approx(1 / math.sqrt(2), rel=1e-12)
    same = torch.randn(2, 1, 5).expand(2, 6, 5) * 3.0
    assert cosine_to_mean(same).tolist() == pytest.approx([1.0, 1.0], rel=1e-12)


def test_cosine_to_mean_weights_by_size_and_skips_empty_slots():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 3, generator=g, dtype=torch.float64)
    size = torch.tensor([[2.0, 1.0, 3.0, 0.0]])
    duplicated = x[:, :3].repeat_interleave(size[0, :3].long(), dim=1)
    assert cosine_to_mean(x, size).item() == pytest.approx(cosine_to_mean(duplicated).item(), rel=1e-12)
    assert cosine_to_mean(x, size).item() != pytest.approx(cosine_to_mean(x).item(), rel=1e-6)


def test_cosine_to_mean_is_nan_where_undefined():
    opposite = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    assert math.isnan(cosine_to_mean(opposite).item())
    assert math.isnan(cosine_to_mean(torch.randn(1, 2, 3), num_prefix=2).item())


# -- selections and their IoU -------------------------------------------------------------------


def constructed_attention():
    """One prefix + 4 tokens. The class token attends 1 > 2 > 3 > 4; the other queries attend
    to 2 and 3, so the column sums (FATR's signed score) rank 2 > 3 > 1 > 4."""
    a = torch.zeros(1, 1, 5, 5)
    a[0, 0, 0] = torch.tensor([0.0, 0.4, 0.3, 0.2, 0.1])
    a[0, 0, 1:] = torch.tensor([0.0, 0.0, 0.5, 0.5, 0.0])
    return a


def test_selection_sets_on_a_constructed_attention():
    sets = selection_sets(constructed_attention(), keep=0.5, num_prefix=1)
    assert sets["evit"].tolist() == [[False, True, True, False, False]]
    assert sets["fatr"].tolist() == [[False, False, True, True, False]]
    assert selection_iou(sets["evit"], sets["fatr"]).item() == pytest.approx(1 / 3)
    # Skipped and invalid tokens are never candidates, and k follows the candidates left (3 -> 2).
    sets = selection_sets(constructed_attention(), 0.5, 1, skip=1)
    assert sets["evit"].tolist() == sets["fatr"].tolist() == [[False, False, True, True, False]]
    sets = selection_sets(constructed_attention(), 0.5, 1, valid=torch.tensor([[True, True, False, True, True]]))
    assert sets["evit"].tolist() == sets["fatr"].tolist() == [[False, True, False, True, False]]


def test_keep_count_follows_the_reducers_rule():
    r = build_reducer("evit", blocks=[0], keep_rate=0.5)
    for keep in (0.01, 0.3, 0.5, 0.7, 0.999, 1.0):
        r.keep[0] = keep
        n = torch.arange(0, 200)
        expected = [0] + [r.num_kept(0, int(v)) for v in n[1:]]
        assert keep_count(n, keep).tolist() == expected, keep
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\]"):
        keep_count(n, 0.0)


def test_top_k_mask_per_image_counts_and_iou_edge_cases():
    score = torch.tensor([[5.0, 1.0, 3.0, 2.0], [0.0, 9.0, 8.0, 7.0]])
    cand = torch.tensor([[True, True, True, True], [False, True, True, True]])
    mask = top_k_mask(score, cand, torch.tensor([2, 1]))
    assert mask.tolist() == [[True, False, True, False], [False, True, False, False]]
    empty = torch.zeros(1, 3, dtype=torch.bool)
    assert math.isnan(selection_iou(empty, empty).item())
    with pytest.raises(ValueError, match="class token"):
        selection_sets(constructed_attention(), 0.5, num_prefix=0)


def capture_with_attention(reducer, images):
    model = tiny_vit()
    apply_reducer(model, reducer, trace_source=True)
    ctx = reduction_context(model)
    steps = []
    ctx.observe(lambda b, before, after: steps.append((b, before, after)), needs={ATTN})
    with torch.no_grad():
        model(images)
    assert steps
    return steps


def test_fatr_set_is_what_fatr_keeps(images):
    keep = 0.6
    for _, before, after in capture_with_attention(
        build_reducer("fatr", blocks=[1, 3], dc_grid=[2, 1], keep_rate=keep), images
    ):
        p, skip = before.num_prefix, before.extra.get(DC_SLOTS, 0)
        sets = selection_sets(before.attn, keep, p, valid=before.size > 0, skip=skip)
        kept_pos = after.pos[:, p + after.extra[DC_SLOTS] :]  # FATR's HF tokens keep their patch index
        truth = (before.pos[:, :, None] == kept_pos[:, None, :]).any(-1)
        truth[:, : p + skip] = False
        assert torch.equal(sets["fatr"], truth)


def test_evit_set_is_what_evit_keeps(images):
    keep = 0.6
    for _, before, after in capture_with_attention(build_reducer("evit", blocks=[1, 3], keep_rate=keep), images):
        sets = selection_sets(before.attn, keep, before.num_prefix, valid=before.size > 0)
        assert torch.equal(sets["evit"], untouched_mask(before, after))  # EViT copies its kept tokens


# -- the measurement: reference against timm, records ---------------------------------------------


def timm_block_outputs(model, images):
    outs = []
    hooks = [blk.register_forward_hook(lambda m, a, o: outs.append(o)) for blk in model.blocks]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    return outs


def test_unreduced_reference_through_the_patch_equals_timms_own_forward(images):
    model = tiny_vit()
    ref = block_statistics(model, NoReduction(), images, num_bands=4, attention_everywhere=True)
    outs = timm_block_outputs(model, images)  # the unpatched model: timm's forward, fused attention
    assert len(outs) == ref.log_amplitude.shape[0]
    for b, x in enumerate(outs):
        tokens = x[:, 1:]
        grid = tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], 8, 8)
        assert torch.equal(ref.log_amplitude[b], diagonal_log_amplitude(grid)), b
        assert torch.equal(ref.cos_to_mean[b], cosine_to_mean(x, num_prefix=1)), b
    # The IoU from attention recomputed from qkv equals the one from timm's own attention map.
    probs = []
    for blk in model.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda m, a, o: probs.append(a[0]))
    with torch.no_grad():
        model(images)
    assert sorted(ref.iou) == list(range(len(model.blocks)))
    for b, attn in enumerate(probs):
        sets = selection_sets(attn, 0.5, 1)
        assert torch.allclose(ref.iou[b], selection_iou(sets["evit"], sets["fatr"]), rtol=0, atol=1e-12), b


def test_painted_grid_of_the_unreduced_model_is_the_token_grid(images):
    # What the reduced runs go through (scatter via the source map) is the plain reshape when
    # nothing is reduced, so the two pipelines measure the same thing.
    x = torch.randn(3, 65, 48)
    source = torch.zeros(3, 65, 64)
    source[:, 1:] = torch.eye(64)
    grid = scatter_to_grid(x, source, 1, (8, 8))
    assert torch.equal(
        diagonal_log_amplitude(grid), diagonal_log_amplitude(x[:, 1:].transpose(1, 2).reshape(3, 48, 8, 8))
    )


def test_spectral_metrics_record_the_papers_analysis(images):
    model = tiny_vit()
    out = spectral_metrics(model, build_reducer("tome", r=4), images, num_bands=4, iou_keep=0.5)
    depth = len(model.blocks)
    assert out["fourier_freq_pi"] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert len(out["fourier_profile"]) == depth and len(out["fourier_profile"][0]) == 5
    assert all(p[0] == 0.0 for p in out["fourier_profile"] + out["fourier_profile_unreduced"])
    last = out["spectral_blocks"][-1]
    assert out["fourier_dlog_pi_last"] == pytest.approx(last["fourier_dlog_pi"])
    assert out["fourier_dlog_pi_last"] == pytest.approx(sum(out["fourier_dlog_pi_last_images"]) / len(images))
    assert len(out["fourier_dlog_pi_last_unreduced_images"]) == len(images)
    assert 0 < last["cos_to_mean"] <= 1 and 0 < last["cos_to_mean_unreduced"] <= 1
    # ToMe reduces in every block: IoU everywhere; at block 0 nothing is reduced yet, so it is the reference's.
    assert sorted(int(b) for b in out["selection_iou"]) == list(range(depth))
    assert out["selection_iou"]["0"] == pytest.approx(out["selection_iou_unreduced"][0], abs=1e-12)
    assert all(0 <= v <= 1 for v in out["selection_iou_unreduced"])


def test_spectral_analysis_bad_input(images):
    from bench.config import Config, DataConfig, SpectralConfig
    from bench.data import ImageSet
    from bench.measure.spectral import spectral_job
    from bench.measure.subject import Measured, subject_of

    with pytest.raises(BenchError, match="square patch grid, got 8x12"):
        block_statistics(tiny_vit(img_size=(32, 48)), NoReduction(), torch.randn(1, 3, 32, 48), 4)
    with pytest.raises(BenchError, match="at least one image"):
        block_statistics(tiny_vit(), NoReduction(), images[:0], 4)
    for spectral, match in (({"iou_keep": 1.5}, "iou_keep must be in"), ({"images": 0}, "images must be at least 1")):
        sc = SpectralConfig(**{"enabled": True, "images": 2, "bands": 4, "iou_keep": 0.5, **spectral})
        cfg = Config(data=DataConfig(batch_size=2), progress=False)
        data = ImageSet(images, torch.zeros(len(images), dtype=torch.long), [""] * len(images), "")
        with pytest.raises(BenchError, match=match):
            spectral_job(sc, subject_of(cfg, tiny_vit(), NoReduction(), data, torch.device("cpu")), Measured())


def test_intervals_hand_computed():
    m, h = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and h == pytest.approx(1.959964 * math.sqrt(5 / 3) / 2, rel=1e-6)
    d, hd = paired_ci([2.0, 3.0, 5.0], [1.0, 2.0, 4.0])  # every image differs by exactly 1
    assert d == pytest.approx(1.0) and hd == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(paired_ci([1.0], [1.0, 2.0])[0])


def synthetic_record(method, values, ref_values, checkpoint="deit_tiny_patch16_224"):
    depth = 3
    blocks = [
        {
            "fourier_dlog_pi": -1.0 - b,
            "fourier_dlog_pi_unreduced": -0.5 - b,
            "cos_to_mean": 0.5,
            "cos_to_mean_unreduced": 0.4,
        }
        for b in range(depth)
    ]
    metrics = {
        "spectral_images": len(values),
        "spectral_blocks": blocks,
        "fourier_freq_pi": [0.0, 0.5, 1.0],
        "fourier_profile": [[0.0, -1.0, -2.0]] * depth,
        "fourier_profile_unreduced": [[0.0, -0.5, -1.0]] * depth,
        "fourier_dlog_pi_last": sum(values) / len(values),
        "fourier_dlog_pi_last_images": values,
        "fourier_dlog_pi_last_unreduced_images": ref_values,
        "cos_to_mean_last": 0.5,
        "cos_to_mean_last_unreduced": 0.4,
        "selection_iou_keep": 0.5,
        "selection_iou": {"1": 0.6},
        "selection_iou_unreduced": [0.3, 0.5, 0.7],
    }
    return {
        "method": method,
        "variant": "",
        "model": "deit_tiny_patch16_224",
        "data_root": "/val",
        "num_images": 64,
        "budget": {"macs_ratio_target": 0.65},
        "config": {"model": {"checkpoint": f"/w/{checkpoint}.safetensors"}},
        "metrics": metrics,
    }


def test_paper_section_pairs_only_records_on_the_same_weights_and_images(tmp_path):
    from bench.report.paper import paper_section

    ref = [-1.0, -2.0, -3.0]
    records = [
        synthetic_record("fatr", [-2.0, -3.0, -4.5], ref),
        synthetic_record("tome", [-2.5, -3.5, -5.0], ref),
        synthetic_record("tome", [-1.5, -2.5, -3.5], [-1.0, -2.0, -3.0], checkpoint="finetuned"),
    ]
    lines, paths = paper_section(records, tmp_path, label=lambda r: r["method"])
    assert [p.name for p in paths] == ["fourier_dlog.png", "oversmoothing.png", "selection_iou.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ") and "---" not in line}
    assert {"unreduced [deit_tiny_patch16_224]", "unreduced [finetuned]"} <= set(rows)
    # ToMe on the same weights: paired difference to FATR is exactly -0.5 on every image.
    assert "| -0.500 ± 0.000 |" in rows["tome [deit_tiny_patch16_224]"]
    # ToMe on the fine-tuned weights has no FATR run on those weights to pair with.
    assert rows["tome [finetuned]"].split(" | ")[3] == "–"
    assert "0.600 (block 1; unreduced 0.500)" in rows["tome [finetuned]"]
