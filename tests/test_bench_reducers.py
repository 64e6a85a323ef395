"""Benchmarks (pytest-benchmark): one reduction step of every reducer on the same
DeiT-Tiny-shaped tokens, a full reduced forward of every method on DeiT-Tiny's architecture at
its default knob, and at batch 1 the same forward with every method at 65% of the unreduced
MACs (the leaderboard's budget, so those rows compare).

Skipped by default (``--benchmark-skip`` in the pytest options); run them with
``pytest --benchmark-only``. Compare within one run: the machines are shared and noisy.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_reducer

from methods.base import ATTN, CLS_ATTN, KEYS, VALUES, ModelInfo
from methods.tokens import initial_state

B, GRID, C, HEADS = 64, (14, 14), 192, 3
N = 1 + GRID[0] * GRID[1]
INFO = ModelInfo(depth=12, num_heads=HEADS, embed_dim=C, num_prefix=1, patch_grid=GRID)

CASES = {
    "fatr": {},
    "tome": {"r": 13},
    "evit": {},
    "kmedoids": {},
    "dpcknn": {},
    "pool": {},
    "topk": {},
    "random": {},
    "pitome": {},
    "tofu": {},
    "mctf": {},
    "ppt": {},
    "ats": {},
    "zerotprune": {},
    "dct": {},
    "diffrate": {},
}

FATR_VARIANTS = {
    "fatr:earlier_default": {"dc_grid": 2, "prop_attn": True, "omega2_form": "logit"},
    "fatr:dc_weight=attn": {"dc_weight": "attn"},
    "fatr:svd_exact": {"score": "svd", "svd_iters": None},
    "fatr:svd_iters=2": {"score": "svd", "svd_iters": 2},
    "fatr:svd_iters=3": {"score": "svd", "svd_iters": 3},
    "fatr:svd_iters=2,dc_weight=attn": {"score": "svd", "svd_iters": 2, "dc_weight": "attn"},
}
"""FATR's options, benchmarked next to one ToMe step (the issue asks for the cost relative to it)."""
STEP_CASES = {**CASES, **FATR_VARIANTS}


@pytest.fixture(scope="module")
def _kept_heap():
    """Time as ``bench.run`` does: glibc keeps freed memory (bench/allocator.py), so a forward
    does not pay page faults for large temporaries that the harness's timings never see. Only
    the benchmarks ask for it: the plain tests of this module run in the suite's workers, which
    keep glibc's default."""
    from bench.allocator import keep_freed_memory

    keep_freed_memory()


@pytest.fixture(scope="module")
def taps():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, C, generator=g)
    keys = torch.randn(B, HEADS, N, C // HEADS, generator=g)
    values = torch.randn(B, HEADS, N, C // HEADS, generator=g)
    attn = torch.randn(B, HEADS, N, N, generator=g).softmax(-1)
    return {"x": x, KEYS: keys, VALUES: values, ATTN: attn, CLS_ATTN: attn[:, :, 0].contiguous()}


@pytest.mark.benchmark(group="reduction-step")
@pytest.mark.usefixtures("_kept_heap")
@pytest.mark.parametrize("name", list(STEP_CASES))
def test_reduction_step(benchmark, name, taps):
    reducer = build_reducer(name.split(":")[0], **STEP_CASES[name])
    reducer.bind(INFO)
    block = next(b for b in range(INFO.depth) if reducer.reduces_at(b))
    needs = reducer.needs(block)
    state = initial_state(taps["x"], 1, GRID, trace_source=False).replace(
        attn=taps[ATTN] if ATTN in needs else None,
        cls_attn=taps[CLS_ATTN] if CLS_ATTN in needs else None,
        keys=taps[KEYS] if KEYS in needs else None,
        values=taps[VALUES] if VALUES in needs else None,
    )
    with torch.inference_mode():  # as the harness times every forward
        out = benchmark.pedantic(reducer.reduce, args=(state, block), rounds=5, iterations=1, warmup_rounds=1)
    expected = reducer.token_counts(1, GRID[0] * GRID[1], INFO.depth)[block][1]
    assert out.x.shape == (B, expected, C)


@pytest.fixture(scope="module")
def small_vit():
    """DeiT-Tiny's architecture (random weights): 12 blocks, so every default schedule applies."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224").eval()


def _time_forward(benchmark, model, reducer, batch: int, rounds: int, warmup: int) -> None:
    """Patch ``model`` with ``reducer``, time its forward on ``batch`` images and check that it
    ran the token counts the reducer promises."""
    from methods import apply_reducer, reduction_context

    apply_reducer(model, reducer)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = benchmark.pedantic(model, args=(x,), rounds=rounds, iterations=1, warmup_rounds=warmup)
    assert out.shape == (batch, 1000)
    counts = reducer.token_counts(1, 196, 12)
    assert reduction_context(model).token_trace == [o for _, o in counts]


@pytest.mark.benchmark(group="reduced-forward")
@pytest.mark.usefixtures("_kept_heap")
@pytest.mark.parametrize("name", ["none", *CASES])
def test_reduced_forward(benchmark, name, small_vit):
    _time_forward(benchmark, small_vit, build_reducer(name, **CASES.get(name, {})), batch=8, rounds=5, warmup=1)


@pytest.mark.benchmark(group="reduced-forward, batch 1, MACs 0.65")
@pytest.mark.usefixtures("_kept_heap")
@pytest.mark.parametrize("name", ["none", *CASES])
def test_reduced_forward_at_batch_one_and_matched_macs(benchmark, name, small_vit):
    """Every method's knob solved for 65% of the unreduced MACs, as the leaderboard does, and
    one image per forward: the real-time case, where a reducer's own operators weigh most."""
    from bench.budget import match_budget
    from bench.measure.flops import VitShape
    from methods import remove_reducer
    from methods.patch import model_info

    remove_reducer(small_vit)  # the budget is solved on the plain model's shape
    reducer = build_reducer(name)
    if name != "none":
        reducer = match_budget(reducer, 0.65, VitShape.of(small_vit), model_info(small_vit)).reducer
    _time_forward(benchmark, small_vit, reducer, batch=1, rounds=20, warmup=3)


def test_every_reducer_class_is_benchmarked():
    """A method added to ``bench/conf/method/`` gets a row in every group (its schedule variants,
    such as ``diffrate_deit_b``, share their class's row)."""
    from conftest import METHOD_CONF, method_names
    from omegaconf import OmegaConf

    def target(name: str) -> str:
        return OmegaConf.load(METHOD_CONF / f"{name}.yaml").reducer["_target_"]

    offered = {target(n) for n in method_names()} - {target("none")}
    assert offered == {target(n) for n in CASES}
