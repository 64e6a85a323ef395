"""Small tools the tests share: run a patched model and capture every reduction step."""

from __future__ import annotations

import re
from pathlib import Path

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


def membership(before, after):
    """(B, N_after, N_before) 0/1: which step-input tokens each output token absorbed."""
    p = before.num_prefix
    overlap = after.source[:, p:] @ before.source[:, p:].transpose(1, 2)
    return (overlap > 0).float()


def assert_step_invariants(before, after, partition=True):
    """What every reduction step keeps: the prefix tokens first and untouched (values and
    sizes), a source map that agrees with the sizes and covers each patch exactly once
    (``partition``: merging) or at most once (pruning drops whole tokens)."""
    p = before.num_prefix
    assert torch.equal(after.x[:, :p], before.x[:, :p]), "prefix tokens changed"
    assert torch.equal(after.size[:, :p], before.size[:, :p])
    src = after.source[:, p:]
    assert torch.allclose(src.sum(-1), patch_sizes(after)), "source map disagrees with sizes"
    cover = src.sum(1)
    if partition:
        assert torch.all(cover == 1), "source map must partition the grid"
    else:
        assert torch.all((cover == 0) | (cover == 1)), "a patch belongs to at most one token"


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


def doc_blocks(language: str, page: str = "adding-a-reducer.md") -> list[str]:
    """The fenced ``language`` blocks of ``docs/<page>``, in order (tests run the page's own code,
    so the page cannot drift from what is tested)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / page).read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)
