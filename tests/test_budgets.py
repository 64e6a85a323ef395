"""Every method's budget knob solves the published budgets, and the solved knob's token counts
are what a forward leaves: the invariants each method used to test in its own file, once.

Budgets on the real DeiT-Tiny architecture (meta device: no weights, no compute); the forward
on a 12-block tiny ViT, so the schedules that depend on depth run as on DeiT.
"""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import build_reducer, method_names, tiny_vit
from helpers import run_capturing

from bench.budget import match_budget
from bench.measure.flops import VitShape
from methods.patch import model_info

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TUNABLE = [m for m in method_names() if build_reducer(m).budget_knob is not None]
NUM_PATCHES = 64  # tiny_vit: 8x8 grid


@pytest.fixture(scope="module")
def deit_tiny() -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model("deit_tiny_patch16_224")


def test_every_method_but_the_reference_is_tunable():
    assert set(method_names()) - set(TUNABLE) == {"none"}


@pytest.mark.parametrize("target", [0.8, 0.65, 0.5])
@pytest.mark.parametrize("method", TUNABLE)
def test_budget_solved_on_deit_tiny(deit_tiny, method, target):
    reducer = build_reducer(method)
    sol = match_budget(reducer, target, VitShape.of(deit_tiny), model_info(deit_tiny), method=method)
    assert abs(sol.ratio / target - 1) < 0.02
    assert type(sol.reducer) is type(reducer)
    assert sol.reducer.hparams == {**reducer.hparams, reducer.budget_knob: sol.value}, "only the knob moves"


@pytest.mark.parametrize("method", TUNABLE)
def test_solved_knob_counts_match_a_forward(method, images):
    model = tiny_vit(depth=12)
    sol = match_budget(build_reducer(method), 0.5, VitShape.of(model), model_info(model), method=method)
    _, _, ctx = run_capturing(model, sol.reducer, images)
    assert ctx.token_trace == [out for _, out in sol.reducer.token_counts(1, NUM_PATCHES, 12)]
