"""The one timm ViT patch that every reducer runs through.

``apply_reducer`` swaps the classes of a timm ``VisionTransformer`` and of its blocks for
subclasses whose ``forward`` threads a :class:`~methods.base.TokenState` through the blocks,
computes attention the same way for every method, and calls the reducer between the
attention residual and the MLP. ``remove_reducer`` swaps the original classes back.

Attention itself is computed in :mod:`methods.attention`: fused
(``F.scaled_dot_product_attention``) unless the block's reducer asked for the full attention
map; proportional attention (``log(size)`` on the logits) goes in as the SDPA additive mask.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from methods.attention import attention_forward
from methods.base import ATTN, CLS_ATTN, KEYS, NEEDS, VALUES, ModelInfo, ReducerConfigError, TokenReducer, TokenState
from methods.tokens import empty_slot_bias, initial_state


class UnsupportedModelError(TypeError):
    """The model is not a timm VisionTransformer this patch knows how to reduce."""


Observer = Callable[[int, TokenState, TokenState], None]
"""Called as ``observe(block, before, after)`` at every reduction."""


class Observation:
    """What one analysis tool added to a :class:`ReductionContext` (a callback, taps); its
    :meth:`remove` takes back exactly that, and leaves every other tool's additions alone."""

    def __init__(self, ctx: ReductionContext, callback: Observer | None, needs: frozenset[str]) -> None:
        self.ctx = ctx
        self.callback = callback
        self.needs = needs

    def remove(self) -> None:
        self.ctx._withdraw(self)


class ReductionContext:
    """Per-model state shared by the patched blocks during one forward pass.

    Args:
        reducer: the bound reducer the blocks call.
        info: what the reducer knows about the model.
        trace_source: keep the source map (which patches each token covers) in the token state.
        patch_embed: the model's patch embedding, which turns an input's size into its patch grid.
    """

    def __init__(self, reducer: TokenReducer, info: ModelInfo, trace_source: bool, patch_embed: nn.Module) -> None:
        self.reducer = reducer
        self.info = info
        self.trace_source = trace_source
        self.patch_embed = patch_embed
        self.state: TokenState | None = None
        """The tokens between blocks during a forward (set by the patched model)."""
        self.image_hw: tuple[int, int] | None = None
        """Height and width of the last forward's input images."""
        self.token_trace: list[int] = []
        """Token count after each block's reduction in the last forward (checked against
        ``TokenReducer.token_counts`` by the tests and the FLOPs measurement)."""
        self._observations: list[Observation] = []
        self._extra_needs: frozenset[str] = frozenset()

    def observe(self, callback: Observer | None = None, needs: Iterable[str] = ()) -> Observation:
        """Add an analysis tool: ``callback`` at every reduction, and ``needs`` (of ``ATTN``,
        ``CLS_ATTN``, ``KEYS``, ``VALUES``) tapped at reduction blocks on top of the reducer's own. Tools add
        to each other; ``.remove()`` on the returned handle takes one back."""
        wanted = frozenset(needs)
        if not wanted <= NEEDS:
            raise ValueError(f"unknown needs {sorted(wanted - NEEDS)}; choose from {sorted(NEEDS)}")
        observation = Observation(self, callback, wanted)
        self._observations.append(observation)
        self._extra_needs = self._extra_needs | wanted
        return observation

    def _withdraw(self, observation: Observation) -> None:
        if observation in self._observations:
            self._observations.remove(observation)
        self._extra_needs = frozenset().union(*(o.needs for o in self._observations))

    @property
    def observers(self) -> tuple[Observer, ...]:
        """The callbacks added with :meth:`observe`, in order."""
        return tuple(o.callback for o in self._observations if o.callback is not None)

    @property
    def extra_needs(self) -> frozenset[str]:
        """Taps requested at reduction blocks on top of the reducer's own (all tools together)."""
        return self._extra_needs

    def attention_bias(self, block: int, dtype: torch.dtype) -> Tensor | None:
        state = self.state
        assert state is not None
        bias = None
        if state.reduced and self.reducer.proportional_attention:
            bias = state.size.log()[:, None, None, :]  # log 0 = -inf masks empty slots too
        elif state.may_have_empty:
            bias = empty_slot_bias(state.size)
        extra = self.reducer.attention_bias(state, block)
        if extra is not None:
            bias = extra if bias is None else bias + extra
        return None if bias is None else bias.to(dtype)


def _reduced_block_forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    if attn_mask is not None or is_causal:
        raise ReducerConfigError("token reduction does not support attention masks or causal attention")
    ctx: ReductionContext = self._reduction_ctx
    idx: int = self._reduction_index
    reducer = ctx.reducer
    state = ctx.state
    if state is None or state.num_tokens != x.shape[1]:
        raise RuntimeError("patched ViT block called outside the patched model's forward")
    needs = (reducer.needs(idx) | ctx.extra_needs) if reducer.reduces_at(idx) else frozenset()
    bias = ctx.attention_bias(idx, x.dtype)
    reweight = reducer.attention_reweight(state, idx)
    valid = (state.size > 0) if reweight is not None and state.reduced else None
    out, taps = attention_forward(self.attn, self.norm1(x), bias, reweight, valid, needs)
    x = x + self.drop_path1(self.ls1(out))
    if reducer.reduces_at(idx):
        snapshot = state.replace(
            x=x, attn=taps.get(ATTN), cls_attn=taps.get(CLS_ATTN), keys=taps.get(KEYS), values=taps.get(VALUES)
        )
        new = reducer.reduce(snapshot, idx)
        for observe in ctx.observers:
            observe(idx, snapshot, new)
        state = new.replace(attn=None, cls_attn=None, keys=None, values=None)
        ctx.state = state
        x = state.x
    ctx.token_trace.append(x.shape[1])
    x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
    ctx.state = state.replace(x=x)
    return x


def _blocks_pre_hook(module: nn.Module, args: tuple) -> None:
    ctx: ReductionContext = module._reduction_ctx
    x = args[0]
    grid = ctx.info.patch_grid
    if ctx.image_hw is not None:
        grid = _feature_grid(ctx.patch_embed, ctx.image_hw)
    num_patches = x.shape[1] - ctx.info.num_prefix
    if grid[0] * grid[1] != num_patches:
        raise UnsupportedModelError(
            f"{num_patches} patch tokens do not fill the {grid[0]}x{grid[1]} patch grid (patch dropout?)"
        )
    ctx.token_trace = []
    ctx.state = initial_state(x, ctx.info.num_prefix, grid, ctx.trace_source)


def _feature_grid(patch_embed: nn.Module, hw: tuple[int, int]) -> tuple[int, int]:
    if hasattr(patch_embed, "dynamic_feat_size"):
        return tuple(int(v) for v in patch_embed.dynamic_feat_size(hw))  # type: ignore[return-value]
    p = patch_embed.patch_size
    return hw[0] // p[0], hw[1] // p[1]


def _model_pre_hook(module: nn.Module, args: tuple) -> None:
    ctx: ReductionContext = module._reduction_ctx
    img = args[0] if args else None
    ctx.image_hw = tuple(img.shape[-2:]) if isinstance(img, Tensor) and img.dim() == 4 else None


def _reduced_pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
    """timm's pooling, size-weighted so merged tokens count for the patches they cover."""
    pool_type = self.global_pool if pool_type is None else pool_type
    if not pool_type or pool_type == "token":
        return x if not pool_type else x[:, 0]
    state: TokenState = self._reduction_ctx.state
    start = 0 if self.pool_include_prefix else self.num_prefix_tokens
    x = x[:, start:]
    w = state.size[:, start:].to(x.dtype)[..., None]
    avg = (x * w).sum(1) / w.sum(1).clamp_min(1e-12)
    mx = x.masked_fill(w == 0, float("-inf")).amax(dim=1)
    if pool_type == "avg":
        return avg
    if pool_type == "max":
        return mx
    if pool_type == "avgmax":
        return 0.5 * (avg + mx)
    raise UnsupportedModelError(f"global_pool={pool_type!r} is not supported with token reduction")


_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(cls: type, methods: dict) -> type:
    key = (cls, tuple(sorted(methods)))
    if key not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[key] = type(f"Reduced{cls.__name__}", (cls,), {"_reduction_original_class": cls, **methods})
    return _PATCHED_CLASSES[key]


def model_info(model: nn.Module) -> ModelInfo:
    """Check that ``model`` is a timm ViT this patch supports and describe it."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(
            f"token reduction needs a timm VisionTransformer (ViT, DeiT, ...), got {type(model).__name__}"
        )
    for i, blk in enumerate(model.blocks):
        base = getattr(type(blk), "_reduction_original_class", type(blk))
        if base is not Block or type(blk.attn) is not Attention:
            raise UnsupportedModelError(
                f"block {i} is a {base.__name__} with {type(blk.attn).__name__}; only timm's standard "
                "Block with Attention is supported"
            )
    if getattr(model, "attn_pool", None) is not None:
        raise UnsupportedModelError("attention-pool heads (global_pool='map') are not supported")
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    return ModelInfo(
        depth=len(model.blocks),
        num_heads=model.blocks[0].attn.num_heads,
        embed_dim=model.embed_dim,
        num_prefix=model.num_prefix_tokens,
        patch_grid=grid,  # type: ignore[arg-type]
    )


def apply_reducer(model: nn.Module, reducer: TokenReducer, trace_source: bool = False) -> nn.Module:
    """Patch a timm ViT in place so ``reducer`` runs in its blocks; returns the model.

    Re-applying replaces the previous reducer. The reducer becomes a submodule
    (``model.token_reducer``) so its parameters (e.g. FATR's ω) and buffers follow ``.to()``;
    it is moved to the model's device here too, and :meth:`~methods.base.TokenReducer.prepare`d
    there, so that a forward never copies anything to the device.
    """
    if is_patched(model):
        remove_reducer(model)
    info = model_info(model)
    reducer.bind(info)
    ctx = ReductionContext(reducer, info, trace_source, model.patch_embed)
    for i, blk in enumerate(model.blocks):
        blk.__class__ = _patched_class(type(blk), {"forward": _reduced_block_forward})
        blk._reduction_ctx = ctx
        blk._reduction_index = i
    model.__class__ = _patched_class(type(model), {"pool": _reduced_pool})
    model._reduction_ctx = ctx
    model.blocks._reduction_ctx = ctx
    model._reduction_hooks = [
        model.register_forward_pre_hook(_model_pre_hook),
        model.blocks.register_forward_pre_hook(_blocks_pre_hook),
    ]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    reducer.to(device)
    reducer.prepare(device)
    model.token_reducer = reducer
    return model


def is_patched(model: nn.Module) -> bool:
    return hasattr(model, "_reduction_ctx")


def reduction_context(model: nn.Module) -> ReductionContext:
    if not is_patched(model):
        raise ValueError("model is not patched; call apply_reducer(model, reducer) first")
    return model._reduction_ctx


def remove_reducer(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_reducer`: original classes, no hooks, no reducer submodule."""
    if not is_patched(model):
        return model
    for h in model._reduction_hooks:
        h.remove()
    for blk in model.blocks:
        blk.__class__ = blk._reduction_original_class
        del blk._reduction_ctx, blk._reduction_index
    model.__class__ = model._reduction_original_class
    del model._reduction_ctx, model.blocks._reduction_ctx, model._reduction_hooks
    del model.token_reducer
    return model


def first_reduction_block(model: nn.Module) -> int | None:
    """The first block at which the patched model's reducer acts, or None if it never does.
    Before it the reduced model computes exactly what the unreduced one computes."""
    reducer = reduction_context(model).reducer
    return next((i for i in range(len(model.blocks)) if reducer.reduces_at(i)), None)


def forward_from_block(model: nn.Module, x: Tensor, block: int) -> Tensor:
    """The patched model's output for ``x``, the tokens entering ``blocks[block]`` (as the
    blocks before it give them), running only ``blocks[block:]``, the final norm and the head.

    Exact only up to the first reduction (:func:`first_reduction_block`): earlier blocks have
    nothing to reduce, so the state they would leave is the initial one. A caller that starts
    from another model's tokens checks the result against a full forward (see
    ``bench.measure.shared_prefix``): the tail follows timm's ``VisionTransformer.forward``."""
    first = first_reduction_block(model)
    if first is None or not 0 <= block <= first:
        raise ValueError(f"cannot start at block {block}: the reducer first acts at block {first}")
    ctx = reduction_context(model)
    ctx.image_hw = None
    _blocks_pre_hook(model.blocks, (x,))
    ctx.token_trace = [x.shape[1]] * block
    for blk in model.blocks[block:]:
        x = blk(x)
    return model.forward_head(model.norm(x))
