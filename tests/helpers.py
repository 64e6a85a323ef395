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
