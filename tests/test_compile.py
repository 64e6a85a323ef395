"""Every reducer's forward is free of host-device syncs and data-dependent shapes.

A sync (``.item()``, ``bool(tensor)``, a shape read from a tensor, a host-side random draw)
stalls the GPU's launch queue once per call and splits ``torch.compile``'s graph. So:

- ``torch.compile(fullgraph=True)`` captures the reduced DeiT-Tiny forward of every method, at
  its default knob and at a budget-solved one, and runs it to the eager output (the ``eager``
  backend traces with dynamo but generates no code; one inductor test for one method);
- on CUDA a forward raises nothing under ``torch.cuda.set_sync_debug_mode("error")``;
- where an algorithm was rewritten to get there, it decides exactly what the old one decided
  (reference implementations of the old code below).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator

import pytest
import timm
import torch
from conftest import build_reducer, knob_cases, one_config_per_reducer, reducer_at, tiny_vit
from helpers import run_capturing

import methods.kmedoids as kmedoids_module
import methods.prune as prune_module
from bench.measure.compiling import compile_pair
from bench.measure.flops import fvcore_macs
from fatr import FATR
from fatr.reducer import DC_EMPTY, DC_SLOTS
from methods import apply_reducer
from methods.base import TokenState
from methods.prune import RandomPrune, random_generator
from methods.tokens import keep_tokens, prefix_index

CASES = knob_cases()


@pytest.fixture(scope="module", autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    """No compiled code or dynamo caches leak into the test files that run after this one."""
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def deit() -> torch.nn.Module:
    """DeiT-Tiny with random weights: capture does not depend on the weights."""
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224").eval()


@pytest.fixture(scope="module")
def images224() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def _compiled(model: torch.nn.Module, backend: str = "eager") -> Callable[[torch.Tensor], torch.Tensor]:
    torch._dynamo.reset()
    return torch.compile(model, fullgraph=True, backend=backend)


# -- 1. one graph ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "knob"), CASES)
def test_reduced_forward_is_one_graph(deit, images224, name, knob):
    apply_reducer(deit, reducer_at(name, knob, deit))
    with torch.no_grad():
        want = deit(images224)
        got = _compiled(deit)(images224)  # fullgraph=True: any graph break raises
    assert torch.equal(got, want)


@pytest.mark.parametrize(("kw", "train"), [({}, True), ({"omega2_form": "logit", "prop_attn": True}, False)])
def test_fatr_with_learned_omega_is_one_graph(images, kw, train):
    """ω and the DC positional term non-zero: the re-weighted path captures too, and so does a
    training forward (gradients reach them) under autograd."""
    model = tiny_vit()
    reducer = FATR(**{"blocks": [1, 3], "dc_grid": [2, 1], **kw})
    apply_reducer(model, reducer)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in reducer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    reducer.refresh_learned()
    with torch.no_grad():
        want = model(images)
        got = _compiled(model)(images)
    assert torch.equal(got, want)
    if train:
        model.requires_grad_(False)
        reducer.requires_grad_(True)
        _compiled(model)(images).square().sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in reducer.parameters())


def test_fatr_learned_flag_is_decided_outside_the_forward(tmp_path):
    """The forward reads a bool that bind, load_omega, load_state_dict, .to() and eval() set."""
    model = tiny_vit()
    reducer = FATR(blocks=[1, 3], dc_grid=[2, 1])
    apply_reducer(model, reducer)
    assert reducer._learned is False
    state = {k: torch.ones_like(v) for k, v in reducer.state_dict().items()}
    reducer.load_state_dict(state)
    assert reducer._learned is True
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, tmp_path / "zero.pt")
    reducer.load_omega(tmp_path / "zero.pt")
    assert reducer._learned is False
    with torch.no_grad():
        reducer.omega1.fill_(0.5)
    model.eval()
    assert reducer._learned is True


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler")
def test_inductor_compiles_fatr(images):
    """Generated code, not only the trace: FATR, whose blocks mix the explicit attention path,
    the fused one with the empty-DC-slot mask, and a DC coarsening (2x2 windows, then one)."""
    model = tiny_vit(depth=2)
    apply_reducer(model, build_reducer("fatr", blocks=[0, 1], dc_grid=[2, 1]))
    with torch.no_grad(), torch._inductor.config.patch(compile_threads=1):
        want = model(images)
        got = _compiled(model, "inductor")(images)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler")
def test_inductor_compiles_a_merge_with_the_gpus_concatenation(images):
    """For CUDA, inductor concatenates pointwise (``torch.cat`` becomes one masked kernel); on
    the CPU it copies, unless ``force_pointwise_cat``. The GPU's way put the old initial positions
    (``arange(-1, P).clamp_min(-1)``) into a sympy Max it could not compare, and every grouping
    reducer failed to compile for the GPU. Forced here, so the CPU suite sees it."""
    model = tiny_vit(depth=2)
    apply_reducer(model, build_reducer("pool", blocks=[0]))
    with torch.no_grad(), torch._inductor.config.patch(force_pointwise_cat=True, compile_threads=1):
        want = model(images)
        got = _compiled(model, "inductor")(images)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler")
def test_the_cpp_wrapper_mode_compiles_both_models_with_inductors_cpp_wrapper(images):
    """``bench.latency.compile=cpp-wrapper`` end to end on the harness's own path: both models
    compiled by inductor with its C++ wrapper (the reduced one calls ATen's sort and gather from
    generated C++), compiled and eager top-1 agreeing, the outputs eager's."""
    model = tiny_vit(depth=2)
    apply_reducer(model, build_reducer("zerotprune", r=[3, 2]))
    reference = tiny_vit(depth=2)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        want = model(images)
    seen = []
    real = torch.compile

    def spying(m, **kw):
        seen.append(kw)
        return real(m, **kw)

    torch._dynamo.reset()
    with pytest.MonkeyPatch.context() as mp, torch._inductor.config.patch(compile_threads=1):
        mp.setattr(torch, "compile", spying)
        pair = compile_pair(model, reference, images, [len(images)], "cpp-wrapper")
        with torch.no_grad():
            got = pair.model(images)
    assert [kw.get("options") for kw in seen] == [{"cpp_wrapper": True}] * 2
    assert all(kw.get("backend") == "inductor" and kw.get("fullgraph") for kw in seen)
    assert pair.metrics["latency_compile_agreement"] == pair.metrics["latency_compile_agreement_unreduced"] == 100.0
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


# -- 2. no sync on CUDA ---------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("name", "knob"), CASES)
def test_cuda_forward_has_no_sync(name, knob):
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224").eval().cuda()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.no_grad():
        model(x)  # CUDA, cuBLAS and cuDNN start up outside the checked forward
        apply_reducer(model, reducer_at(name, knob, model))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = model(x)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", [n for n in one_config_per_reducer() if n != "none"])
def test_cuda_inductor_compiles_every_reduction_step(name):
    """Inductor lowers some operators to Triton only on CUDA (sorts, scans, scatters), so a
    reducer that compiles on the CPU can still fail to compile there, and a GPU's torch is not
    CI's (torch 2.11 on the lent H200). The first and the last
    reduction step of the budget-solved reducer, each compiled alone under bf16 autocast as the
    GPU sweeps run it (the whole model takes a hundred seconds a method), give the eager step's
    shapes and nearly all of its decisions (rounding may flip a near tie)."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224").eval().cuda()
    reducer = reducer_at(name, "budget" if build_reducer(name).budget_knob else "default", model)
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, steps, _ = run_capturing(model, reducer, x, trace_source=False)
        assert steps, f"{name} reduced nothing"
        for block, before, after in steps[:1] + steps[1:][-1:]:  # the first and the last step
            torch._dynamo.reset()
            step = torch.compile(lambda s, block=block: reducer.reduce(s, block), fullgraph=True, dynamic=False)
            with torch.no_grad():
                got = step(before)
            assert got.x.shape == after.x.shape and torch.isfinite(got.x).all()
            assert _share_left_alike(after.pos, got.pos, before.patch_grid) > 0.9


def _share_left_alike(want: torch.Tensor, got: torch.Tensor, grid: tuple[int, int]) -> float:
    """Of the patches a step left as they were in ``want`` (``pos`` >= 0), the share it left so in
    ``got`` too: decisions compared as sets, since one flipped choice shifts every later
    position of a sorted keep list."""
    n = grid[0] * grid[1]

    def left(pos: torch.Tensor) -> torch.Tensor:
        marks = torch.zeros(pos.shape[0], n + 1, dtype=torch.bool, device=pos.device)
        return marks.scatter_(1, torch.where(pos >= 0, pos, n), True)[:, :n]

    a, b = left(want), left(got)
    if not a.any():  # a step that merged every patch (ToFu's last): alike when so did the other
        return float(not b.any())
    return float((a & b).sum() / a.sum())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fatr_with_learned_omega_has_no_sync():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224").eval().cuda()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    reducer = build_reducer("fatr")
    apply_reducer(model, reducer)
    with torch.no_grad():
        model(x)
        for p in reducer.parameters():
            p.normal_(std=0.1)
        model.eval()  # decides on the host that ω is now non-zero
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(x)
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted({n for n, _ in CASES}))
def test_cuda_model_counts_the_macs_the_cpu_model_counts(name):
    """fvcore's trace turns shapes into CPU tensors; a reducer that computes with one
    (``clamp_max(n - 1)``) broke the count of a CUDA model before it was traced on a CPU copy."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224").eval()
    apply_reducer(model, build_reducer(name))
    x = torch.randn(1, 3, 224, 224)
    on_cpu = fvcore_macs(model, x)
    assert fvcore_macs(model.cuda(), x.cuda()) == on_cpu
    assert next(model.parameters()).is_cuda  # counted on a copy


# -- 3. decisions unchanged -----------------------------------------------------------------------
def _same_decisions(model, old, new, images):
    """Equal logits and equal source maps after every reduction."""
    ref, ref_steps, _ = run_capturing(model, old, images)
    got, got_steps, _ = run_capturing(model, new, images)
    assert torch.equal(got, ref)
    assert len(got_steps) == len(ref_steps) > 0
    for (_, _, a), (_, _, b) in zip(ref_steps, got_steps, strict=True):
        assert torch.equal(a.source, b.source) and torch.equal(a.size, b.size)


def _old_cluster_members(group: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The old padding: to the largest cluster's actual size (``int(count.max())``, a sync)."""
    b, n = group.shape
    order = group.argsort(dim=-1, stable=True)
    count = torch.zeros(b, k, dtype=torch.long).scatter_add_(1, group, torch.ones_like(group))
    start = count.cumsum(-1) - count
    m = int(count.max())
    slot = torch.arange(m)
    own_count = count.gather(1, group)[:, :, None]
    valid = slot < own_count
    pos = start.gather(1, group)[:, :, None] + torch.minimum(slot, own_count - 1)
    return order.gather(1, pos.view(b, -1)).view(b, n, m), valid


@pytest.mark.parametrize(
    "kw", [{"blocks": [1, 3], "keep_rate": 0.6}, {"blocks": [0, 2, 4], "keep_rate": [0.9, 0.3, 0.5], "iters": 3}]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_kmedoids_static_padding_decides_as_before(monkeypatch, kw, seed):
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    model = tiny_vit()
    with monkeypatch.context() as m:
        m.setattr(kmedoids_module, "cluster_members", _old_cluster_members)
        ref, ref_steps, _ = run_capturing(model, build_reducer("kmedoids", **kw), images)
    got, got_steps, _ = run_capturing(model, build_reducer("kmedoids", **kw), images)
    assert torch.equal(got, ref)
    assert len(got_steps) == len(ref_steps) == len(kw["blocks"])
    for (_, _, a), (_, _, b) in zip(ref_steps, got_steps, strict=True):
        assert torch.equal(a.source, b.source)


class _OldRandomPrune(RandomPrune):
    """The old draw: a CPU generator created and drawn from in every forward."""

    def reduce(self, state: TokenState, block: int) -> TokenState:
        b, p = state.x.shape[0], state.num_prefix
        n = state.num_tokens - p
        keep = self.num_kept(block, n)
        if keep >= n:
            return state
        keys = torch.rand(b, n, generator=random_generator(self.seed, block))
        kept = keys.topk(keep, dim=-1).indices.sort(dim=-1).values + p
        return keep_tokens(state, torch.cat([prefix_index(state), kept], dim=1))


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_random_tables_keep_the_tokens_the_per_forward_draw_kept(monkeypatch, batch):
    monkeypatch.setattr(prune_module, "KEPT_ROWS", 4)  # batch 7 outgrows the table: redrawn
    images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    kw = {"blocks": [0, 2, 4], "keep_rate": [0.9, 0.5, 0.7], "seed": 3}
    _same_decisions(tiny_vit(), _OldRandomPrune(**kw), RandomPrune(**kw), images)


class _OldFATR(FATR):
    """The old empty-slot check: masks only when a slot of this batch is empty (a sync)."""

    def reduce(self, state: TokenState, block: int) -> TokenState:
        new = super().reduce(state, block)
        p, d = new.num_prefix, new.extra[DC_SLOTS]
        empty = not self.proportional_attention and bool((new.size[:, p : p + d] == 0).any())
        return new.replace(extra={**new.extra, DC_EMPTY: empty})


@pytest.mark.parametrize(
    "kw",
    [
        {"blocks": [1, 3, 4], "dc_grid": [2, 1, 1]},
        {"blocks": [1, 3, 4], "dc_grid": 2},
        {"blocks": [1, 3], "dc_grid": [4, 2], "keep_rate": 0.9},  # empty slots in most images
        {"blocks": [1, 3], "dc_grid": [2, 2], "prop_attn": True, "omega2_form": "logit"},
    ],
)
def test_fatr_static_empty_mask_decides_as_before(images, kw):
    _same_decisions(tiny_vit(), _OldFATR(**kw), FATR(**kw), images)
