"""Small tools the tests share: run a patched model and capture every reduction step."""

from __future__ import annotations

import torch

from methods import apply_reducer, reduction_context


def run_capturing(model, reducer, images, trace_source=True):
    """Forward ``images`` with ``reducer`` applied; return (logits, steps, ctx).

    ``steps`` is a list of ``(block, before, after)`` token states at every reduction.
    """
    apply_reducer(model, reducer, trace_source=trace_source)
    ctx = reduction_context(model)
    steps = []
    ctx.observe(lambda b, before, after: steps.append((b, before, after)))
    with torch.no_grad():
        logits = model(images)
    return logits, steps, ctx


def patch_sizes(state):
    return state.size[:, state.num_prefix :]


def hand_state(x, num_prefix=1, size=None, **taps):
    """A :class:`~methods.base.TokenState` of hand-made tokens ``x`` (B, N, C): the first
    ``num_prefix`` are prefix tokens, the rest patches in a 1-row grid, each its own source
    (scaled by its size); ``taps`` are the block's ``attn``, ``cls_attn``, ``keys``, ``values``."""
    from methods.base import TokenState

    b, n, _ = x.shape
    size = torch.ones(b, n) if size is None else size
    source = torch.zeros(b, n, n - num_prefix)
    source[:, num_prefix:] = torch.eye(n - num_prefix) * size[:, num_prefix:, None]
    return TokenState(
        x=x,
        size=size,
        pos=torch.arange(-num_prefix, n - num_prefix).clamp_min(-1).expand(b, -1),
        num_prefix=num_prefix,
        patch_grid=(1, n - num_prefix),
        grid=None,
        source=source,
        **taps,
    )
