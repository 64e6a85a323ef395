"""Reduced accuracy passes that start from the unreduced pass's tokens: same predictions, or
a full forward where that would not be exact."""

from __future__ import annotations

import pytest
import torch
from conftest import build_reducer, method_arguments, method_names, tiny_vit

import bench.measure.shared_prefix as shared_prefix
from bench.measure.accuracy import predict
from bench.measure.shared_prefix import keeping_block_inputs, start_block
from bench.models import model_without_reducer
from methods import apply_reducer, first_reduction_block, forward_from_block

FIRST = 2  # every method below first reduces at block 2 of the 6-block tiny ViT
AT_BLOCKS = [m for m in method_names() if "blocks" in method_arguments(m)]
"""Methods that reduce at chosen blocks; the others (ToMe and its kin) act from block 0."""


def _reduced(name: str) -> torch.nn.Module:
    kw = {"blocks": [FIRST, 4]} if name in AT_BLOCKS else {}
    if name == "fatr":
        kw["dc_grid"] = [2, 1]
    model = tiny_vit(num_classes=100)
    apply_reducer(model, build_reducer(name, **kw))
    return model


def _images(n: int = 24) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(4))


def _unreduced_pass(model: torch.nn.Module, images: torch.Tensor):
    plain = model_without_reducer(model)
    return predict(plain, images, batch_size=10, show_progress=False, keep_block=start_block(model))


@pytest.mark.parametrize("name", AT_BLOCKS)
def test_a_pass_started_at_the_first_reduction_gives_the_full_passs_predictions(name):
    model, images = _reduced(name), _images()
    assert first_reduction_block(model) == FIRST
    base = _unreduced_pass(model, images)
    assert base.block_inputs is not None and base.block_inputs.block == FIRST
    assert base.block_inputs.tokens.shape[:1] == (len(images),)
    full = predict(model, images, batch_size=10, show_progress=False)
    shared = predict(model, images, batch_size=10, show_progress=False, start=base.block_inputs)
    assert shared.shared == f"blocks 0-{FIRST - 1} from the unreduced pass"
    assert torch.equal(shared.top5, full.top5)


def test_the_kept_tokens_are_those_entering_the_block():
    model, images = _reduced("evit"), _images(7)
    plain = model_without_reducer(model)
    seen = []
    plain.blocks[FIRST].register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    with torch.no_grad(), keeping_block_inputs(plain, FIRST, images) as kept:
        plain(images[:4])
        plain(images[4:])
    assert torch.equal(kept[0].tokens, torch.cat(seen))


def test_logits_from_the_first_reduction_block_equal_a_full_forward():
    model, images = _reduced("fatr"), _images(5)
    plain = model_without_reducer(model)
    entering = []
    plain.blocks[FIRST].register_forward_pre_hook(lambda m, a: entering.append(a[0]))
    with torch.no_grad():
        plain(images)
        assert torch.equal(forward_from_block(model, entering[0], FIRST), model(images))
        with pytest.raises(ValueError, match="first acts at block 2"):
            forward_from_block(model, entering[0], FIRST + 1)


def test_tome_acting_from_block_zero_shares_nothing():
    model, images = _reduced("tome"), _images()
    assert start_block(model) is None
    evit = _reduced("evit")
    base = _unreduced_pass(evit, images)
    out = predict(model, images, batch_size=10, show_progress=False, start=base.block_inputs)
    assert out.shared == "not shared (the reducer acts from block 0)"
    assert torch.equal(out.top5, predict(model, images, batch_size=10, show_progress=False).top5)


def _assert_full_forwards(model, images, start):
    out = predict(model, images, batch_size=10, show_progress=False, start=start)
    assert out.shared.startswith("full forwards (the tokens entering block 2")
    assert torch.equal(out.top5, predict(model, images, batch_size=10, show_progress=False).top5)


def test_other_weights_fall_back_to_full_forwards():
    """A fine-tuned reduced model starts from other tokens: the first batch shows it."""
    model, images = _reduced("evit"), _images()
    base = _unreduced_pass(model, images)
    with torch.no_grad():
        model.blocks[0].mlp.fc2.weight.mul_(1.5)
    _assert_full_forwards(model, images, base.block_inputs)


def test_a_reducer_that_acts_before_its_first_reduction_falls_back(monkeypatch):
    model, images = _reduced("evit"), _images()
    base = _unreduced_pass(model, images)
    reducer = model.token_reducer
    monkeypatch.setattr(reducer, "attention_bias", lambda state, block: torch.full((1, 1, 1, 1), 0.5 * (block == 0)))
    with torch.no_grad():
        assert not torch.equal(model(images[:10]), model_without_reducer(model)(images[:10]))
    _assert_full_forwards(model, images, base.block_inputs)


def test_other_images_or_a_kept_set_over_budget_are_not_used(monkeypatch):
    model, images = _reduced("evit"), _images()
    base = _unreduced_pass(model, images)
    other = images.clone()
    out = predict(model, other, batch_size=10, show_progress=False, start=base.block_inputs)
    assert out.shared == "not shared (the tokens were kept for other images)"
    monkeypatch.setattr(shared_prefix, "MAX_BYTES", 1000)
    assert _unreduced_pass(model, images).block_inputs is None
