"""MACs two ways, which must agree: fvcore's traced count and an analytic count.

fvcore reports multiply-accumulates of the ops it has handles for and silently counts
``aten::scaled_dot_product_attention`` as 0 — the attention itself, for every fused block.
We register a handle for it, and explicit zero handles for the ops that do no
multiply-accumulate work (softmax, scatter/gather, sorting, elementwise), so that a missing
count is a decision, not an accident. The analytic count is the textbook ViT cost with the
token count updated after every reduction plus each reducer's own matmuls; tests hold the two
within 2% for every method.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bench.errors import BenchError
from methods import TokenReducer, reduction_context
from methods.patch import model_info

if TYPE_CHECKING:
    from bench.measure.subject import Measured, Subject


def _shape(v: Any) -> list[int]:
    return list(v.type().sizes())


def sdpa_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """``Q·Kᵀ`` and ``A·V``: ``B·H·N·M·d`` each (``d_v`` for the second)."""
    q, k, v = (_shape(t) for t in inputs[:3])
    batch = math.prod(q[:-2])
    return batch * q[-2] * k[-2] * q[-1] + batch * q[-2] * k[-2] * v[-1]


def _zero(inputs: list[Any], outputs: list[Any]) -> int:
    return 0


NO_MAC_OPS = [
    "aten::softmax",
    "aten::log_softmax",
    "aten::scatter_add_",
    "aten::scatter_add",
    "aten::scatter_",
    "aten::scatter",
    "aten::scatter_reduce",
    "aten::gather",
    "aten::index_select",
    "aten::index_add_",
    "aten::index_add",
    "aten::index_put",
    "aten::index_put_",
    "aten::index",
    "aten::sort",
    "aten::argsort",
    "aten::topk",
    "aten::where",
    "aten::add",
    "aten::sub",
    "aten::mul",
    "aten::div",
    "aten::gelu",
    "aten::log",
    "aten::exp",
    "aten::mean",
    "aten::sum",
    "aten::clamp_min",
    "aten::clamp",
    "aten::reciprocal",
    "aten::lt",
    "aten::gt",
    "aten::ge",
    "aten::le",
    "aten::eq",
    "aten::ne",
    "aten::linalg_vector_norm",
    "aten::norm",
    "aten::sqrt",
    "aten::pow",
    "aten::empty_like",
    "aten::zeros_like",
    "aten::ones_like",
    "aten::full_like",
    "aten::masked_fill",
    "aten::max",
    "aten::min",
    "aten::amax",
    "aten::argmax",
    "aten::argmin",
    "aten::abs",
    "aten::neg",
    "aten::rsub",
    "aten::fill_",
    "aten::copy_",
    "aten::bitwise_not",
    "aten::logical_not",
    "aten::cumsum",
    "aten::randperm",
    "aten::rand",
    "aten::floor_divide",
    "aten::remainder",
    "aten::sigmoid",
    "aten::square",
]


def fvcore_macs(model: nn.Module, images: torch.Tensor) -> int:
    """MACs of one forward of ``images`` (per the whole batch) as fvcore traces them.

    Traced on a CPU copy of a model that lives elsewhere: MACs depend on shapes alone, and
    tracing turns every shape into a CPU tensor, which a reducer computing with one on CUDA
    (``idx.clamp_max(n - 1)``) cannot mix with its device's tensors. One untraced forward
    first: constants a reducer builds once and caches (DCT's operators are matrix products)
    are not part of what a forward costs."""
    if images.device.type != "cpu":
        model, images = copy.deepcopy(model).cpu(), images.cpu()
    with warnings.catch_warnings():  # fvcore's import trips torch.jit.script deprecation notices
        warnings.simplefilter("ignore", FutureWarning)
        from fvcore.nn import FlopCountAnalysis

    handles = {op: _zero for op in NO_MAC_OPS}
    handles["aten::scaled_dot_product_attention"] = sdpa_macs
    with torch.no_grad():
        model(images)
        analysis = FlopCountAnalysis(model, images).set_op_handle(**handles)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        return int(analysis.total())


@dataclass(frozen=True)
class VitShape:
    """The numbers the analytic count needs, read off a timm ViT."""

    depth: int
    dim: int
    heads: int
    mlp_hidden: int
    patch: int
    in_chans: int
    num_prefix: int
    num_classes: int
    num_head_layers: int

    @classmethod
    def of(cls, model: nn.Module) -> VitShape:
        model_info(model)
        blk = model.blocks[0]
        pe = model.patch_embed
        return cls(
            depth=len(model.blocks),
            dim=model.embed_dim,
            heads=blk.attn.num_heads,
            mlp_hidden=blk.mlp.fc1.out_features,
            patch=pe.patch_size[0] * pe.patch_size[1],
            in_chans=pe.proj.in_channels,
            num_prefix=model.num_prefix_tokens,
            num_classes=model.num_classes,
            num_head_layers=2 if getattr(model, "head_dist", None) is not None else 1,
        )


def analytic_macs(shape: VitShape, reducer: TokenReducer, num_patches: int) -> int:
    """Per image: patch embed + blocks (attention at the incoming token count, MLP at the
    reduced count) + head + the reducer's own matmuls. ``reducer`` must be bound."""
    c = shape.dim
    total = num_patches * c * shape.in_chans * shape.patch
    counts = reducer.token_counts(shape.num_prefix, num_patches, shape.depth)
    for n_in, n_out in counts:
        total += 4 * n_in * c * c + 2 * n_in * n_in * c
        total += 2 * n_out * c * shape.mlp_hidden
    total += sum(reducer.overhead_macs_per_block(shape.num_prefix, num_patches, shape.depth, c, shape.heads))
    return total + shape.num_head_layers * c * shape.num_classes


def check_token_counts(model: nn.Module, reducer: TokenReducer, image: torch.Tensor) -> None:
    """Refuse a reducer whose :meth:`~methods.TokenReducer.token_counts` disagrees with the
    tokens a real forward of ``image`` through the patched ``model`` has after each block.

    The analytic MACs and budget matching are computed from ``token_counts``; a user's reducer
    that reduces but keeps the inherited "no reduction" counts would otherwise get silently
    wrong MACs and budgets."""
    ctx = reduction_context(model)
    with torch.no_grad():
        model(image)
    seen = list(ctx.token_trace)
    assert ctx.state is not None
    grid = ctx.state.patch_grid
    num_prefix, depth = ctx.info.num_prefix, ctx.info.depth
    counts = reducer.token_counts(num_prefix, grid[0] * grid[1], depth)
    name = type(reducer).__name__
    if len(counts) != len(seen):
        raise BenchError(
            f"reducer {name}: token_counts gives {len(counts)} blocks, the model has {len(seen)}; "
            "override token_counts to match reduce (MACs and budgets are computed from it)"
        )
    n = num_prefix + grid[0] * grid[1]
    for block, ((n_in, n_out), real) in enumerate(zip(counts, seen, strict=True)):
        if (n_in, n_out) != (n, real):
            raise BenchError(
                f"reducer {name}: token_counts says {n_in} tokens enter block {block} and {n_out} leave it, "
                f"but a real forward has {n} and {real}; override token_counts to match reduce "
                "(MACs and budgets are computed from it)"
            )
        n = real


def macs_report(model: nn.Module, reducer: TokenReducer, image: torch.Tensor) -> dict[str, float | None]:
    """GMACs per image both ways for a patched model: fvcore on ``image`` (one image) and the
    analytic count for its patch grid. They must agree within 2%.

    The reducer's ``token_counts`` is first checked against a real forward
    (:func:`check_token_counts`). A reducer that reduces nothing but spends matmuls of its own
    without counting them (``overhead_macs``) gets an analytic count that misses them: it is
    reported as missing (None) instead."""
    check_token_counts(model, reducer, image)
    counted = fvcore_macs(model, image) / 1e9
    analytic = analytic_macs(VitShape.of(model), reducer, model_info(model).num_patches) / 1e9
    if type(reducer).token_counts is TokenReducer.token_counts and abs(counted / analytic - 1) > 0.02:
        analytic = None
    return {"gmacs": counted, "gmacs_analytic": analytic}


def flop_metrics(model: nn.Module, reducer: TokenReducer, image: torch.Tensor) -> dict[str, Any]:
    """fvcore and analytic GMACs per image (they must agree within 2%), and parameters."""
    report: dict[str, Any] = macs_report(model, reducer, image)
    report["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    return report


def flops_job(enabled: bool, subject: Subject, out: Measured) -> None:
    """GMACs and parameters (``bench.flops``) and, for a reduced model, its MACs ratio; the
    unreduced model's come from the measurement cache when it has them."""
    s = subject
    image = s.data.images[:1].to(s.device)
    if not s.reduced and s.cache is not None:
        out.metrics.update(s.cache.get_or_compute("flops", {}, lambda: flop_metrics(s.model, s.reducer, image))[0])
    else:
        out.metrics.update(flop_metrics(s.model, s.reducer, image))
    if s.base is not None:
        out.metrics["baseline_gmacs"] = s.base.metrics["gmacs"]
        out.metrics["macs_ratio"] = out.metrics["gmacs"] / s.base.metrics["gmacs"]
