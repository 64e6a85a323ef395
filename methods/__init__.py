"""Token reducers behind one interface, and the single timm ViT patch that runs them."""

from methods.base import (
    ATTN,
    CLS_ATTN,
    KEYS,
    VALUES,
    KeepRateReducer,
    ModelInfo,
    ReducerConfigError,
    TokenReducer,
    TokenState,
)
from methods.patch import (
    UnsupportedModelError,
    apply_reducer,
    first_reduction_block,
    forward_from_block,
    reduction_context,
    remove_reducer,
)

__all__ = [
    "ATTN",
    "CLS_ATTN",
    "KEYS",
    "VALUES",
    "KeepRateReducer",
    "ModelInfo",
    "ReducerConfigError",
    "TokenReducer",
    "TokenState",
    "UnsupportedModelError",
    "apply_reducer",
    "first_reduction_block",
    "forward_from_block",
    "reduction_context",
    "remove_reducer",
]
