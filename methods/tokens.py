"""Batched token bookkeeping shared by all reducers: keep a subset, or merge into groups.

Every reducer ends in one of these two operations, so sizes, positions and source maps are
updated the same way everywhere and a bug here shows up in every method's tests.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from methods.base import TokenState

T = TypeVar("T")


def flat_rows(idx: Tensor, n: int) -> Tensor:
    """Row indices ``idx`` (B, K) into per-image blocks of ``n`` rows, as one flat index into
    the (B·n)-row view: ``idx[b, k] + b·n``."""
    b = idx.shape[0]
    if b == 1:
        return idx.reshape(-1)
    return (idx + row_offsets(int(b), int(n), idx.device)).reshape(-1)


def expanded_index(idx: Tensor, shape: torch.Size) -> Tensor:
    """``idx`` (B, K) repeated over the trailing dims of ``shape`` (B, K, ...), as ``gather`` and
    ``scatter_add_`` along dim 1 take it (a view: nothing is copied)."""
    return idx.reshape(idx.shape + (1,) * (len(shape) - 2)).expand(shape)


def batch_gather(t: Tensor, idx: Tensor) -> Tensor:
    """``t[b, idx[b]]`` for ``t`` of shape (B, N, ...) and ``idx`` (B, K).

    Whole rows (``t`` with 3 or more dims) are copied with one ``index_select`` on the
    flattened batch: ``gather`` with an index expanded over the channels reads one index per
    element, and on the CPU it was 3x (batch 1) to 10x (batch 32) slower for DeiT-Tiny's
    tokens. The copied values are the same. Under ``torch.compile`` the expanded ``gather`` is
    kept: inductor turns it into one indexed load, fused with what reads it."""
    if t.dim() == 2:
        return t.gather(1, idx)
    if torch.compiler.is_compiling():
        return t.gather(1, expanded_index(idx, idx.shape + t.shape[2:]))
    b, n = t.shape[:2]
    rows = t.reshape((b * n,) + t.shape[2:]).index_select(0, flat_rows(idx, n))
    return rows.reshape(idx.shape + t.shape[2:])


def batch_scatter_add(out: Tensor, idx: Tensor, src: Tensor) -> Tensor:
    """``out[b, idx[b, i]] += src[b, i]`` in place (``out`` (B, G, ...), ``idx`` (B, N),
    ``src`` (B, N, ...)); returns ``out``.

    For rows (3 or more dims) one ``index_add_`` on the flattened batch, for the reason
    :func:`batch_gather` gives (2x to 5x faster than ``scatter_add_`` on the CPU). Each output
    row still sums its rows in token order, starting from ``out``, so the sums are the same.
    Under ``torch.compile`` the expanded ``scatter_add_`` is kept, as in :func:`batch_gather`."""
    if out.dim() == 2:
        return out.scatter_add_(1, idx, src)
    if torch.compiler.is_compiling():
        return out.scatter_add_(1, expanded_index(idx, src.shape), src)
    b, g = out.shape[:2]
    flat = out.view((b * g,) + out.shape[2:])
    flat.index_add_(0, flat_rows(idx, g), src.reshape((-1,) + src.shape[2:]))
    return out


_CACHE_CLEARS: list[Callable[[], None]] = []


def register_constant_cache(clear: Callable[[], None]) -> None:
    """Have :func:`clear_constant_caches` call ``clear`` too (a module with its own cache of
    shape constants, such as DCT's operators)."""
    _CACHE_CLEARS.append(clear)


def clear_constant_caches() -> None:
    """Drop every cached shape constant (:func:`shape_constant`'s and the registered caches').

    Constants are keyed by device, so a forward on fake tensors that claim a device (the
    device-clean test runs the reducers on fake CUDA tensors on a CPU-only machine) must not
    leave its fakes where a real forward on that device would find them; it also frees them."""
    for clear in _CACHE_CLEARS:
        clear()


def shape_constant(maxsize: int = 256) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Cache a builder of tensors that depend on shapes alone (plain ints, dtypes, devices).

    Output slots, prefix indices and initial scores follow from token counts; at batch 1 a
    step's cost is the number of operators it dispatches, so every block and forward shares
    the tensors instead of building them again. They are built outside inference mode, so a
    model timed under ``torch.inference_mode`` can still train in the same process. Read
    only: callers expand or index them, never write to them. Under ``torch.compile`` the
    builder itself is traced (the graph holds the result as a constant), which is what dynamo
    would do with the cache anyway, minus its warning."""

    def wrap(build: Callable[..., T]) -> Callable[..., T]:
        @functools.lru_cache(maxsize=maxsize)
        def cached(*args: Any) -> T:
            with torch.inference_mode(False):
                return build(*args)

        @functools.wraps(build)
        def get(*args: Any) -> T:
            return build(*args) if torch.compiler.is_compiling() else cached(*args)

        register_constant_cache(cached.cache_clear)
        return get

    return wrap


@shape_constant(maxsize=1024)
def token_range(start: int, stop: int, device: torch.device) -> Tensor:
    """``torch.arange(start, stop)`` (int64), shared by every block (:func:`shape_constant`)."""
    return torch.arange(start, stop, device=device)


@shape_constant()
def row_offsets(b: int, n: int, device: torch.device) -> Tensor:
    """``(B, 1)``: ``i·n`` in row ``i``, the first row of each of ``B`` blocks of ``n`` rows in a
    flattened view (:func:`flat_rows`), shared by every block and forward (:func:`shape_constant`)."""
    return torch.arange(0, b * n, n, device=device)[:, None]


def unit_rows(x: Tensor) -> Tensor:
    """``x`` divided by the L2 norm of its last axis: ``F.normalize``'s arithmetic (the same
    bits), without the Python layers it calls through (at batch 1 dispatch is the cost)."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)


_SUMMED_HEADS = 4  # up to this many heads `mean` adds them in order (above: in interleaved partial sums)
_SUMMED_ROWS = 1024  # and from this many tokens (B·N): below it one ``mean`` dispatch wins


def head_mean(keys: Tensor) -> Tensor:
    """``keys.mean(dim=1)`` for ``keys`` ``(B, H, N, D)``, the metric the merging methods match
    on; the same bits, faster on the CPU.

    The keys are a strided view into the attention's qkv output, and ``mean`` over the head
    axis of that view took 0.7 ms per block in a batch-32 DeiT-Tiny forward on the project's
    2-core CPU, against 0.3 ms for adding the heads one by one (2026-12-04): a twelfth of
    ToMe's whole reduction cost there. Up to four heads ``mean`` adds them in order and divides
    by ``H`` (not a multiply by ``1/H``), and so does this: the same bits in float32 and
    float64 (a test checks it). With more heads ``mean`` keeps interleaved partial sums for some
    head widths, so those models (DeiT-S/B, ViT-L) keep ``mean``, as do small batches (one
    dispatch wins there), other dtypes (their ``mean`` accumulates in float32) and compiled
    graphs."""
    heads = keys.shape[1]
    if (
        torch.compiler.is_compiling()
        or keys.dtype not in (torch.float32, torch.float64)
        or not 2 <= heads <= _SUMMED_HEADS
        or keys.shape[0] * keys.shape[2] < _SUMMED_ROWS
    ):
        return keys.mean(dim=1)
    total = keys[:, 0] + keys[:, 1]
    for h in range(2, heads):
        total.add_(keys[:, h])
    return total.div_(heads)


def prefix_index(state: TokenState) -> Tensor:
    """Indices (B, P) of the prefix tokens."""
    b = state.x.shape[0]
    return token_range(0, int(state.num_prefix), state.x.device).expand(b, -1)


def keep_tokens(state: TokenState, idx: Tensor) -> TokenState:
    """Keep the tokens at ``idx`` (B, K) (prefix included by the caller), copying them exactly."""
    return state.replace(
        x=batch_gather(state.x, idx),
        size=batch_gather(state.size, idx),
        pos=batch_gather(state.pos, idx),
        source=None if state.source is None else batch_gather(state.source, idx),
        grid=None,
        reduced=True,
    )


def merge_groups(
    state: TokenState, group: Tensor, num_groups: int, weight: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Size-weighted mean of the tokens of each group.

    ``group`` (B, N) holds each token's group in ``[0, num_groups)``; tokens with group -1 are
    left out. Returns ``(x, size, source)`` of the groups; an empty group gets size 0 and a
    zero token. ``weight`` overrides the per-token weights (default: sizes).
    """
    x, size = state.x, state.size
    b, _, c = x.shape
    w = size if weight is None else weight
    valid = group >= 0
    g = torch.where(valid, group, torch.zeros_like(group))
    w = torch.where(valid, w, torch.zeros_like(w))
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    weighted = x.to(acc_dtype) * w[..., None].to(acc_dtype)
    sums = batch_scatter_add(x.new_zeros(b, num_groups, c, dtype=acc_dtype), g, weighted)
    wsum = size.new_zeros(b, num_groups, dtype=acc_dtype).scatter_add_(1, g, w.to(acc_dtype))
    new_size = size.new_zeros(b, num_groups).scatter_add_(1, g, torch.where(valid, size, 0 * size))
    merged = (sums / wsum.clamp_min(1e-12)[..., None]).to(x.dtype)
    source = None
    if state.source is not None:
        src = state.source * valid[..., None].to(state.source.dtype)
        source = batch_scatter_add(state.source.new_zeros(b, num_groups, state.source.shape[-1]), g, src)
    return merged, new_size, source


def group_counts(group: Tensor, num_groups: int) -> Tensor:
    """How many tokens each group has ``(B, num_groups)``; ``group`` (B, N) in ``[0, num_groups)``."""
    return group.new_zeros(group.shape[0], num_groups).scatter_add_(1, group, torch.ones_like(group))


def merge_every_token(
    state: TokenState, group: Tensor, num_groups: int, weight: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`merge_groups` where every token has a group (none is -1).

    The same sums in the same order, in a third of the operations: the weighted tokens, their
    weights and (when ``weight`` is not the sizes) their sizes go through one scatter-add
    (:func:`batch_scatter_add`). Bipartite merging calls this in every block; at batch 1 its
    cost is the number of operations, not their size. The weighted tokens are written straight
    into the scatter's source rows (no ``cat`` of the parts): one ``B×N×C`` copy less per block,
    about 1% of a batch-32 PiToMe forward on the project's 2-core CPU (2026-12-05)."""
    x, size = state.x, state.size
    b, n, c = x.shape
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    w = (size if weight is None else weight).to(acc_dtype)[..., None]
    parts = [w] if weight is None else [w, size.to(acc_dtype)[..., None]]  # sizes not the weights: sum them too
    width = c + len(parts)
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
        src = torch.cat([x.to(acc_dtype) * w, *parts], dim=-1)  # out= has no autograd; inductor fuses the cat
    else:
        src = torch.empty(b, n, width, dtype=acc_dtype, device=x.device)
        torch.mul(x.to(acc_dtype), w, out=src[..., :c])
        for i, part in enumerate(parts):
            src[..., c + i : c + i + 1] = part
    acc = batch_scatter_add(x.new_zeros(b, num_groups, width, dtype=acc_dtype), group, src)
    sums, wsum = acc[..., :c], acc[..., c : c + 1]
    merged = (sums / wsum.clamp_min(1e-12)).to(x.dtype)
    source = None
    if state.source is not None:
        source = batch_scatter_add(state.source.new_zeros(b, num_groups, state.source.shape[-1]), group, state.source)
    return merged, acc[..., -1].to(size.dtype), source


def merge_all(state: TokenState, group: Tensor, num_groups: int) -> TokenState:
    """Replace every token by its group's size-weighted mean (prefix tokens in their own groups)."""
    x, size, source = merge_every_token(state, group, num_groups)
    pos = torch.full(size.shape, -1, dtype=state.pos.dtype, device=size.device)
    return state.replace(x=x, size=size, pos=pos, source=source, grid=None, reduced=True)


def concat_states(state: TokenState, parts: list[tuple[Tensor, Tensor, Tensor, Tensor | None]]) -> TokenState:
    """Concatenate ``(x, size, pos, source)`` parts along the token axis into a new state."""
    x = torch.cat([p[0] for p in parts], dim=1)
    size = torch.cat([p[1] for p in parts], dim=1)
    pos = torch.cat([p[2] for p in parts], dim=1)
    source = None if state.source is None else torch.cat([p[3] for p in parts], dim=1)
    return state.replace(x=x, size=size, pos=pos, source=source, grid=None, reduced=True)


def class_or_received_attention(state: TokenState, valid: Tensor | None = None) -> Tensor:
    """``(B, H, N)``: the first prefix token's attention row (the ``cls_attn`` tap), or in a
    model without prefix tokens the attention each token receives, averaged over the queries
    (over the ``valid`` ones only, when given: ATS's empty slots ask nothing): how the
    class-attention rankers (PPT, ATS) score tokens where there is no class token."""
    if state.num_prefix > 0:
        return state.cls_attn
    if valid is None:
        return state.attn.float().mean(dim=2)
    queries = valid.float()[:, None, :, None]  # (B, 1, N queries, 1)
    return (state.attn.float() * queries).sum(dim=2) / queries.sum(dim=2).clamp_min(1.0)


def empty_slot_bias(size: Tensor) -> Tensor:
    """Additive attention bias ``(B, 1, 1, N)``: 0 on filled slots, -inf on empty (size-0) ones."""
    return torch.zeros_like(size).masked_fill(size == 0, float("-inf"))[:, None, None, :]


@shape_constant()
def initial_positions(num_prefix: int, num_patches: int, device: torch.device) -> Tensor:
    """``pos`` before the first block: -1 for the prefix tokens, then 0..P-1. Built by a cat,
    not ``arange(-prefix, P).clamp_min(-1)``: inductor turned that clamp into a sympy Max of
    index expressions, which its pointwise concatenation (CUDA's; the CPU's only when forced) of
    ``pos[:, :prefix]`` with merged positions could not compare, and every grouping reducer
    failed to compile for the GPU (``tests/test_compile.py`` forces it)."""
    prefix = torch.full((num_prefix,), -1, device=device, dtype=torch.long)
    return torch.cat([prefix, torch.arange(num_patches, device=device)])


def initial_state(x: Tensor, num_prefix: int, patch_grid: tuple[int, int], trace_source: bool) -> TokenState:
    """State before the first block: every patch token has size 1 and its own position."""
    b, n, _ = x.shape
    num_patches = n - num_prefix
    size = torch.ones(b, n, device=x.device, dtype=torch.float32)
    pos = initial_positions(num_prefix, num_patches, x.device).expand(b, -1)
    source = None
    if trace_source:
        source = torch.zeros(b, n, num_patches, device=x.device, dtype=torch.float32)
        source[:, num_prefix:] = torch.eye(num_patches, device=x.device)
    return TokenState(
        x=x, size=size, pos=pos, num_prefix=num_prefix, patch_grid=patch_grid, grid=patch_grid, source=source
    )
