"""Every reducer's forward is device-clean, checked on a machine without a GPU.

``tests/test_compile.py`` runs a forward under ``torch.cuda.set_sync_debug_mode("error")``, but
only where CUDA is, and CI has none. Here the same DeiT-Tiny forward runs on fake tensors that
say they live on CUDA (``FakeTensorMode``: shapes, dtypes and devices without data; torch
supports this without a GPU and in CPU-only builds, for tracing CUDA code). A fake tensor
has no value to read, so a host read (``.item()``, ``bool(tensor)``, a shape taken from a
tensor's values) raises, and fake tensors check devices the way CUDA kernels do, so a constant
built on the CPU (an index, a mask, a table) and mixed into the CUDA forward raises too; on a
GPU that is an error or a copy and a sync in every forward. The same fake forwards run every
method at DeiT-S, DeiT-B and ViT-L and at 1024 px, and a forward on the meta device (shapes
alone) runs too.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import timm
import torch
from conftest import build_reducer, knob_cases, one_config_per_reducer, reducer_at
from helpers import doc_blocks
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from bench.models import set_resolution
from fatr import FATR
from methods import apply_reducer, reduction_context
from methods.base import TokenReducer
from methods.patch import model_info
from methods.tokens import clear_constant_caches

CASES = knob_cases()


@pytest.fixture(autouse=True)
def _no_fake_constants_left(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Cached shape constants are keyed by device: none built here may reach a real CUDA forward.
    FATR keeps the decision whether ω is non-zero that it made on the CPU (:func:`_keep_learned_decision`)."""
    monkeypatch.setattr(FATR, "refresh_learned", _keep_learned_decision)
    clear_constant_caches()
    yield
    clear_constant_caches()


@pytest.fixture(scope="module")
def deit() -> nn.Module:
    """The CPU model budgets are solved on (a knob depends on shapes alone)."""
    return timm.create_model("deit_tiny_patch16_224").eval()


def _keep_learned_decision(self: FATR) -> bool:
    """FATR's host decision whether ω is non-zero, made where ω changes (never in a forward),
    reads values, which fake tensors do not have: the test keeps the decision made on the CPU."""
    self._learned_key = self._learned_version()
    return self._learned


def meta_model(name: str = "deit_tiny_patch16_224") -> nn.Module:
    """The architecture without weights (the meta device), in eval mode."""
    with torch.device("meta"):
        return timm.create_model(name).eval()


def counted_tokens(model: nn.Module, reducer: TokenReducer) -> list[int]:
    """Tokens after every block by ``reducer.token_counts``, the counts budgets are solved from."""
    info = model_info(model)
    return [after for _, after in reducer.token_counts(info.num_prefix, info.num_patches, info.depth)]


def fake_cuda_forward(model: nn.Module, reducer: TokenReducer, batches: tuple[int, ...] = (2,)) -> list[torch.Tensor]:
    """``model`` (built on the meta device) reduced by ``reducer``, run at each batch size on
    fake CUDA tensors, all in one fake mode (cached constants are shared between forwards)."""
    apply_reducer(model, reducer)
    cuda = torch.device("cuda")
    with FakeTensorMode():  # no default-device context: a tensor built without a device is on the CPU
        for module in model.modules():
            for name, p in module._parameters.items():
                if p is not None:
                    fake = torch.empty(p.shape, dtype=p.dtype, device=cuda)
                    module._parameters[name] = nn.Parameter(fake, p.requires_grad)
            for name, b in module._buffers.items():
                if b is not None:
                    module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=cuda)
        size = model.patch_embed.img_size
        with torch.no_grad():
            return [model(torch.empty(b, 3, *size, device=cuda)) for b in batches]


@pytest.mark.parametrize(("name", "knob"), CASES)
def test_forward_reads_no_value_and_stays_on_the_device(deit, name, knob):
    reducer = reducer_at(name, knob, deit)
    model = meta_model()
    batch = 1 if knob == "default" else 3  # both paths (some copy rows one way at batch 1)
    (out,) = fake_cuda_forward(model, reducer, (batch,))
    assert out.shape == (batch, 1000) and out.device.type == "cuda"


@pytest.mark.parametrize("name", one_config_per_reducer())
def test_forward_on_the_meta_device_computes_shapes(name):
    """On the meta device (shapes without data or weights) too: DCT and the grouping reducers
    turned autocast off with ``torch.autocast("meta")``, which does not exist (now
    :func:`methods.precision.without_autocast`)."""
    model = meta_model()
    apply_reducer(model, build_reducer(name))
    with torch.no_grad():
        out = model(torch.empty(2, 3, 224, 224, device="meta"))
    assert out.shape == (2, 1000) and out.is_meta


SIZES = ("deit_small_patch16_224", "deit_base_patch16_224", "vit_large_patch16_224")
SIZED_CASES = [(s, n) for s in SIZES for n in one_config_per_reducer() if n != "none"] + [
    ("deit_small_patch16_224", "diffrate_deit_s"),  # DiffRate's schedules searched for these sizes
    ("deit_base_patch16_224", "diffrate_deit_b"),
]


@pytest.mark.parametrize(("size", "name"), SIZED_CASES)
def test_every_size_runs_the_token_counts_its_budget_was_solved_with(size, name):
    """Only DeiT-Tiny runs real forwards in CI; at the other sizes the speed table's budgets
    are solved analytically from ``token_counts``. A fake forward at each size (other head
    counts, widths and depths; ViT-L's 24 blocks) checks that it runs and that the tokens after
    every block are the counts the budget was solved with."""
    model = meta_model(size)
    reducer = reducer_at(name, "budget", model)
    (out,) = fake_cuda_forward(model, reducer)
    assert out.shape == (2, 1000) and reduction_context(model).token_trace == counted_tokens(model, reducer)


@pytest.mark.parametrize("name", [n for n in one_config_per_reducer() if n != "none"])
def test_high_resolution_runs_the_token_counts_it_claims(deit, name):
    """The scaling measurement runs every method up to 4096 px, which only a GPU reaches in
    time: at 1024 px (4096 patches; DCT resamples by FFT above 512 tokens, pooling works on a
    64×64 grid) the forward runs and leaves the counts ``token_counts`` gives for that grid."""
    reducer = reducer_at(name, "budget", deit)  # the knob is solved at 224 px
    model = set_resolution(meta_model(), 1024)
    (out,) = fake_cuda_forward(model, reducer, (1,))
    assert model_info(model).num_patches == 64 * 64 and out.shape == (1, 1000)
    assert reduction_context(model).token_trace == counted_tokens(model, reducer)


@pytest.mark.parametrize("kw", [{}, {"omega2_form": "logit", "prop_attn": True}])
def test_fatr_with_learned_omega_reads_no_value(kw):
    """The re-weighted path (ω and the DC positional term non-zero) too."""
    reducer = build_reducer("fatr", **kw)
    reducer._learned = True
    model = meta_model()
    assert fake_cuda_forward(model, reducer)[0].shape == (2, 1000)
    assert reducer._learned


def test_the_documented_user_reducer_is_device_clean():
    """docs/adding-a-reducer.md's example, run from the page: its indices are built on the
    tokens' device (an earlier version of the page built them on the CPU; this test fails on it)."""
    (code,) = doc_blocks("python")
    namespace: dict[str, object] = {}
    exec(compile(code, "adding-a-reducer.md", "exec"), namespace)
    model = meta_model()
    (out,) = fake_cuda_forward(model, namespace["EveryOther"]())
    assert out.shape == (2, 1000)


def test_a_constant_built_on_the_cpu_is_caught(monkeypatch):
    """The check can fail: top-k pruning whose prefix index is built on the CPU."""
    import methods.tokens as tokens

    real = tokens.token_range
    monkeypatch.setattr(tokens, "token_range", lambda start, stop, device: real(start, stop, torch.device("cpu")))
    model = meta_model()
    with pytest.raises(Exception, match="same device"):
        fake_cuda_forward(model, build_reducer("topk"))


def test_a_host_read_is_caught():
    """The check can fail: a reducer that reads a value on the host."""

    class Reads(TokenReducer):
        def reduces_at(self, block: int) -> bool:
            return block == 0

        def reduce(self, state, block):
            if bool(state.x.mean() > 0):
                return state
            return state

    model = meta_model()
    with pytest.raises(Exception, match="local_scalar_dense|data-dependent|DataDependent"):
        fake_cuda_forward(model, Reads())
