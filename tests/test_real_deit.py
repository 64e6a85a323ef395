"""Integration on the real DeiT-Tiny weights and real ImageNet validation images."""

from __future__ import annotations

import pytest
import torch
from conftest import build_reducer

from methods import apply_reducer, remove_reducer

pytestmark = pytest.mark.shared


def test_patched_without_reduction_matches_unpatched(deit_tiny, val_batch):
    images, _ = val_batch
    x = images[:16]
    with torch.no_grad():
        ref = deit_tiny(x)
        apply_reducer(deit_tiny, build_reducer("none"))
        out = deit_tiny(x)
        remove_reducer(deit_tiny)
    assert (out - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("name,kw", [("tome", {"r": 13}), ("evit", {"keep_rate": 0.7})])
def test_reduced_predictions_mostly_agree(deit_tiny, val_batch, name, kw):
    images, labels = val_batch
    with torch.no_grad():
        remove_reducer(deit_tiny)
        ref = deit_tiny(images).argmax(-1)
        apply_reducer(deit_tiny, build_reducer(name, **kw))
        pred = deit_tiny(images).argmax(-1)
        remove_reducer(deit_tiny)
    agreement = (pred == ref).float().mean().item()
    assert agreement >= 0.8, f"{name} agrees with the unreduced model on only {agreement:.0%}"
    # the unreduced model is right on most of these real images: labels are wired correctly
    assert (ref == labels).float().mean().item() >= 0.6
