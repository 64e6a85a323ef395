"""Every ViT layout docs/adding-a-reducer.md lists works with every method, FLOPs pass included.

The docs say ``methods.apply_reducer`` patches any timm ``VisionTransformer``: DeiT,
distilled DeiT (2 prefix tokens), register tokens, LayerScale, q/k-norm, average pooling.
ToMe once ran there in eager mode and crashed only in the FLOPs pass (``shape mismatch
[187] vs [188]`` on distilled DeiT): fvcore traces the model with ``torch.jit.trace``, where a
tensor's shape is a traced tensor, not an int, and ToMe's prefix-slot permutation did set
arithmetic on it. So every method config (``bench/conf/method/*.yaml``) is run here on a tiny
random ViT of each layout through a reduced forward *and* the FLOPs job, which also refuses a
``token_counts`` that disagrees with the real forward.

The one pairing that is refused on purpose: EViT and top-k rank tokens by the class token's
attention, so a model without a class token gets a ``ReducerConfigError`` that says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from conftest import METHOD_CONF, build_reducer, method_names, tiny_distilled_vit, tiny_vit
from omegaconf import OmegaConf

from bench.measure.flops import flops_job
from methods import ReducerConfigError, TokenReducer, apply_reducer, reduction_context
from methods.tome import _prefix_first, bipartite_groups

NUM_CLASSES = 10
BLOCKS = [1, 3, 4]  # the configs' [3, 6, 9] scaled to the tiny ViT's 6 blocks
NEEDS_CLASS_TOKEN = {"evit", "topk"}  # rank tokens by the class token's attention
# tracing on purpose here: its notes about constants and its deprecation are expected
TRACE_WARNINGS = pytest.mark.filterwarnings(
    "ignore::torch.jit.TracerWarning", "ignore:.*torch.jit.trace.*:FutureWarning"
)


LAYOUTS: dict[str, Callable[[], torch.nn.Module]] = {
    # DeiT: one class token (1 prefix, 65 tokens)
    "cls": lambda: tiny_vit(),
    # distilled DeiT: class + distillation token (2 prefix, 66 tokens), two heads
    "distilled": lambda: tiny_distilled_vit(num_classes=NUM_CLASSES),
    # vit_*_reg4_dinov2: class + 4 register tokens (5 prefix, 69 tokens), no_embed_class, LayerScale
    "registers": lambda: tiny_vit(reg_tokens=4, no_embed_class=True, init_values=1e-5),
    # no class token, average pooling (0 prefix, 64 tokens)
    "avg_no_cls": lambda: tiny_vit(class_token=False, global_pool="avg"),
    # class token with average pooling
    "avg_cls": lambda: tiny_vit(global_pool="avg"),
    # LayerScale and q/k-norm
    "layerscale_qknorm": lambda: tiny_vit(init_values=1e-1, qk_norm=True),
}


def method_for_tiny_vit(name: str) -> TokenReducer:
    """``method=<name>`` from its config, with the reduction blocks moved into the tiny ViT's
    depth (everything else, e.g. ToMe's ``r=13`` and FATR's DC grid, as configured)."""
    cfg = OmegaConf.load(METHOD_CONF / f"{name}.yaml")
    return build_reducer(name, **({"blocks": BLOCKS} if "blocks" in cfg.reducer else {}))


def refused(method: str, model: torch.nn.Module) -> bool:
    return method in NEEDS_CLASS_TOKEN and model.num_prefix_tokens == 0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def run_flops_job(model: torch.nn.Module, reducer: TokenReducer, images: torch.Tensor, base=None) -> dict:
    """``bench.measure.flops.flops_job`` on the fields of a ``Subject`` it reads."""
    subject = SimpleNamespace(
        model=model,
        reducer=reducer,
        data=SimpleNamespace(images=images),
        device=torch.device("cpu"),
        reduced=base is not None,
        cache=None,
        base=base,
    )
    out = SimpleNamespace(metrics={})
    flops_job(True, subject, out)
    return out.metrics


@pytest.fixture(scope="module")
def unreduced_macs(images: torch.Tensor) -> dict[str, SimpleNamespace]:
    """Each layout's unreduced FLOPs record (``method=none``), the base of the MACs ratios."""
    bases = {}
    for layout, make in LAYOUTS.items():
        model = make()
        reducer = method_for_tiny_vit("none")
        apply_reducer(model, reducer)
        bases[layout] = SimpleNamespace(metrics=run_flops_job(model, reducer, images))
    return bases


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("method", method_names())
def test_method_runs_on_layout(method: str, layout: str, images: torch.Tensor, unreduced_macs: dict) -> None:
    model = LAYOUTS[layout]()
    reducer = method_for_tiny_vit(method)
    if refused(method, model):
        with pytest.raises(ReducerConfigError, match="class token"):
            apply_reducer(model, reducer)
        return
    apply_reducer(model, reducer)
    ctx = reduction_context(model)
    steps: list[tuple] = []
    watch = ctx.observe(lambda block, before, after: steps.append((before, after)))

    with torch.no_grad():
        logits = model(images)
    watch.remove()
    assert logits.shape == (len(images), NUM_CLASSES)
    assert torch.isfinite(logits).all()
    prefix, depth = model.num_prefix_tokens, len(model.blocks)
    for before, after in steps:  # prefix tokens stay first and untouched
        assert torch.equal(after.x[:, :prefix], before.x[:, :prefix])
        assert torch.equal(after.size[:, :prefix], before.size[:, :prefix])
    counts = reducer.token_counts(prefix, 64, depth)
    assert ctx.token_trace == [n_out for _, n_out in counts]
    assert ctx.state.num_prefix == prefix and ctx.state.x.shape[1] == counts[-1][1]

    # the FLOPs pass as a job runs it: checks token_counts against a forward, then fvcore traces
    metrics = run_flops_job(model, reducer, images, base=unreduced_macs[layout])
    assert math.isfinite(metrics["gmacs"]) and metrics["gmacs"] > 0
    if metrics["gmacs_analytic"] is not None:
        # the analytic count leaves out norms, which weigh more on a 48-wide ViT than on DeiT
        assert metrics["gmacs"] == pytest.approx(metrics["gmacs_analytic"], rel=0.04)
    if method == "none":
        assert metrics["macs_ratio"] == pytest.approx(1.0)
    else:
        assert metrics["macs_ratio"] < 0.8, "the reduction did not show in the traced MACs"


@TRACE_WARNINGS
@pytest.mark.parametrize("layout", ["cls", "distilled", "registers", "avg_no_cls"])
def test_tome_trace_computes_the_eager_forward(layout: str, images: torch.Tensor) -> None:
    """fvcore counts the graph ``torch.jit.trace`` records; on every prefix count it must be
    the forward that runs in eager mode (same logits), not merely a graph that does not crash."""
    model = LAYOUTS[layout]()
    apply_reducer(model, method_for_tiny_vit("tome"))
    x = images[:1]
    with torch.no_grad():
        eager = model(x)
        traced = torch.jit.trace(model, x, check_trace=False)(x)
    torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5)


@TRACE_WARNINGS
@pytest.mark.parametrize("num_prefix,n", [(1, 65), (2, 66), (2, 51), (5, 69), (5, 20), (0, 64)])
def test_bipartite_groups_same_under_trace(num_prefix: int, n: int) -> None:
    """The matching itself, traced against eager: under a trace shapes are tensors, and the
    prefix-slot permutation must come out the same (it once came out longer than the slots)."""
    metric = torch.randn(2, n, 16, generator=torch.Generator().manual_seed(n))
    r = (n - num_prefix) // 2

    def groups(m: torch.Tensor) -> torch.Tensor:
        return bipartite_groups(m, r, num_prefix)[0]

    eager, num_out = bipartite_groups(metric, r, num_prefix)
    traced = torch.jit.trace(groups, metric, check_trace=False)(metric)
    assert torch.equal(traced, eager)
    assert num_out == n - r
    # prefix tokens keep their own slots, at the front, in order
    assert torch.equal(eager[:, :num_prefix], torch.arange(num_prefix).expand(2, -1))
    assert int(eager.max()) == num_out - 1


def test_prefix_permutation_from_tensor_counts() -> None:
    """Counts given as 0-dim tensors (what a traced shape is) give the int counts' permutation."""
    for p, n_unm, num_out in [(2, 20, 53), (5, 22, 56), (3, 7, 30)]:
        want = _prefix_first(p, n_unm, num_out, torch.device("cpu"))
        got = _prefix_first(torch.tensor(p), torch.tensor(n_unm), torch.tensor(num_out), torch.device("cpu"))
        assert torch.equal(got, want)
        assert sorted(want.tolist()) == list(range(num_out))
