"""Prepacked oneDNN linear layers in the accuracy pass: same predictions, nothing left behind."""

from __future__ import annotations

import pytest
import torch
from conftest import build_reducer, tiny_vit
from torch import nn

from bench.measure.accuracy import predict
from bench.measure.packed_linear import packed_linear_kernels, prepacked_linears
from methods import apply_reducer

ONEDNN = packed_linear_kernels("cpu").startswith("oneDNN")
needs_onednn = pytest.mark.skipif(not ONEDNN, reason=f"no packed linears here: {packed_linear_kernels('cpu')}")


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if type(m) is nn.Linear]


@needs_onednn
@pytest.mark.parametrize(
    "reducer, kw",
    [(None, {}), ("tome", {}), ("fatr", {"blocks": [1, 3], "dc_grid": [2, 1]}), ("evit", {"blocks": [1, 3]})],
)
def test_packed_forward_matches_and_every_linear_is_switched_back(reducer, kw, images):
    vit = tiny_vit()
    if reducer is not None:
        apply_reducer(vit, build_reducer(reducer, **kw))
    with torch.no_grad():
        expected = vit(images)
        with prepacked_linears(vit, "cpu") as switched:
            assert switched == len(_linears(vit)) > 0
            assert all("forward" in vars(layer) for layer in _linears(vit))
            got = vit(images)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not any("forward" in vars(layer) for layer in _linears(vit))


@needs_onednn
def test_layers_switch_back_when_the_block_raises(images):
    vit = tiny_vit()
    with pytest.raises(RuntimeError, match="boom"), prepacked_linears(vit, "cpu"):
        raise RuntimeError("boom")
    assert not any("forward" in vars(layer) for layer in _linears(vit))


@needs_onednn
def test_autograd_and_other_dtypes_take_the_layers_own_forward(images):
    vit = tiny_vit()
    with prepacked_linears(vit, "cpu"):
        loss = vit(images).square().mean()  # grad enabled: nn.Linear's own forward
        loss.backward()
        assert vit.head.weight.grad is not None
        with torch.no_grad():
            x = torch.randn(2, vit.head.in_features, dtype=torch.float64)
            assert vit.head.to(torch.float64)(x).dtype == torch.float64
    vit.head.to(torch.float32)


def test_opt_out_and_other_devices_keep_pytorchs_kernels(monkeypatch, images):
    vit = tiny_vit()
    assert packed_linear_kernels("cuda").startswith("default")
    with prepacked_linears(vit, "cuda") as switched:
        assert switched == 0
    monkeypatch.setenv("FATR_LINEAR", "default")
    assert packed_linear_kernels("cpu") == "default (FATR_LINEAR=default)"
    with prepacked_linears(vit, "cpu") as switched:
        assert switched == 0
        assert not any("forward" in vars(layer) for layer in _linears(vit))


@needs_onednn
def test_a_layer_whose_packed_output_disagrees_is_left_alone(monkeypatch, images):
    vit = tiny_vit()

    def wrong(x, w, b, attr, scalars, algorithm):
        return torch.zeros(x.shape[:-1] + (w.shape[0],))

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", wrong)
    with prepacked_linears(vit, "cpu") as switched:
        assert switched == 0


@needs_onednn
def test_predict_gives_the_same_top5_with_and_without_packing(monkeypatch):
    vit = tiny_vit(num_classes=100)
    g = torch.Generator().manual_seed(3)
    imgs = torch.randn(40, 3, 32, 32, generator=g)
    packed = predict(vit, imgs, batch_size=16, show_progress=False)
    monkeypatch.setenv("FATR_LINEAR", "default")
    plain = predict(vit, imgs, batch_size=16, show_progress=False)
    assert torch.equal(packed.top5, plain.top5)
