"""Token reducers behind one interface, and the single timm ViT patch that runs them."""

from methods.base import (
    ATTN,
    CLS_ATTN,
    KEYS,
    KeepRateReducer,
    ModelInfo,
    ReducerConfigError,
    TokenReducer,
    TokenState,
    UnknownMethodError,
    available_methods,
    build_reducer,
    reducer_class,
    register,
)
from methods.patch import UnsupportedModelError, apply_reducer, reduction_context, remove_reducer

# Importing the method modules registers them.
from methods import dpcknn, evit, identity, kmedoids, pool, prune, tome  # noqa: E402,F401  isort: skip

__all__ = [
    "ATTN",
    "CLS_ATTN",
    "KEYS",
    "KeepRateReducer",
    "ModelInfo",
    "ReducerConfigError",
    "TokenReducer",
    "TokenState",
    "UnknownMethodError",
    "UnsupportedModelError",
    "apply_reducer",
    "available_methods",
    "build_reducer",
    "reducer_class",
    "reduction_context",
    "register",
    "remove_reducer",
]
