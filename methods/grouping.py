"""Helpers shared by the grouping baselines (pooling, k-medoids, DPC-kNN).

All three end the same way: every patch token gets a group, each group becomes one token (the
size-weighted mean of its members) and the prefix tokens are copied in front unchanged. They
differ only in how the groups are chosen, and the clustering ones share the distance matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

from methods.base import KeepRateReducer, TokenState
from methods.precision import without_autocast
from methods.tokens import batch_gather, group_counts, merge_groups


def merge_patch_groups(
    state: TokenState, group: Tensor, num_groups: int, grid: tuple[int, int] | None = None
) -> TokenState:
    """Merge the patch tokens by ``group`` (B, N - P) in ``[0, num_groups)``; prefix copied.

    A group with a single member keeps that member's ``pos``; merged groups get -1. The prefix
    tokens are copied exactly (not averaged), so they stay bit-identical in any dtype.
    """
    p = state.num_prefix
    full = torch.cat([torch.full_like(group[:, :p], -1), group], dim=1)
    x, size, source = merge_groups(state, full, num_groups)
    count = group_counts(group, num_groups)
    pos_sum = state.pos.new_zeros(group.shape[0], num_groups).scatter_add_(1, group, state.pos[:, p:])
    pos = torch.where(count == 1, pos_sum, torch.full_like(pos_sum, -1))
    return state.replace(
        x=torch.cat([state.x[:, :p], x], dim=1),
        size=torch.cat([state.size[:, :p], size], dim=1),
        pos=torch.cat([state.pos[:, :p], pos], dim=1),
        source=None if source is None else torch.cat([state.source[:, :p], source], dim=1),
        grid=grid,
        reduced=True,
    )


def pairwise_sq_distances(x: Tensor) -> Tensor:
    """Squared Euclidean distances ``(B, N, N)`` between the rows of ``x`` (B, N, C), in float32.

    One matmul, ``x @ x^T`` (``N·N·C`` multiply-accumulates per image, which the cost model and
    fvcore both count), then ``|a|² + |b|² - 2ab`` in place. Autocast is turned off so the
    cancellation is done in float32 even under bf16 autocast. The diagonal is exactly 0.
    """
    with without_autocast(x.device):
        xf = x.float()
        sq = (xf * xf).sum(-1)
        d2 = xf @ xf.transpose(-1, -2)
        d2.mul_(-2.0).add_(sq[:, :, None]).add_(sq[:, None, :]).clamp_min_(0.0)
        d2.diagonal(dim1=1, dim2=2).zero_()
        return d2


def assign_to_centres(dist: Tensor, centres: Tensor) -> Tensor:
    """Nearest centre (index into ``centres``) of every token; each centre owns itself.

    ``dist`` is (B, N, N) (any increasing function of the distance), ``centres`` (B, K)
    distinct token indices. Ties go to the first centre. Only the ``N - K`` other tokens are
    compared with the centres (at most ``N²/4`` distances, fewer the more centres there are),
    and forcing every centre into its own group means no group is ever empty.
    """
    b, n, _ = dist.shape
    k = centres.shape[1]
    ids = torch.arange(k, device=dist.device).expand(b, -1)
    group = torch.empty(b, n, dtype=torch.long, device=dist.device).scatter_(1, centres, ids)
    if k == n:
        return group
    is_centre = torch.zeros(b, n, dtype=torch.uint8, device=dist.device).scatter_(1, centres, 1)
    others = is_centre.argsort(dim=-1, stable=True)[:, : n - k]  # the non-centres, in index order
    rows = batch_gather(dist, others)
    to_centres = rows.gather(2, centres[:, None, :].expand(-1, n - k, -1))
    return group.scatter_(1, others, to_centres.min(dim=-1).indices)


def cluster_members(group: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The members of every token's own cluster, padded: ``(members, valid)``, both (B, N, M).

    ``group`` (B, N) in ``[0, k)`` with every cluster non-empty, so no cluster has more than
    ``M = N - k + 1`` members: a bound from the shapes, where the largest cluster's actual
    size would need a device sync (and a data-dependent shape under ``torch.compile``).
    ``members[b, i]`` lists, in token order, the tokens with the same group as token ``i``;
    ``valid`` marks the real entries (padding repeats a valid index).
    """
    b, n = group.shape
    m = n - k + 1
    order = group.argsort(dim=-1, stable=True)
    count = group_counts(group, k)
    start = count.cumsum(-1) - count
    slot = torch.arange(m, device=group.device)
    own_count = count.gather(1, group)[:, :, None]
    valid = slot < own_count
    pos = start.gather(1, group)[:, :, None] + torch.minimum(slot, own_count - 1)
    members = order.gather(1, pos.view(b, -1)).view(b, n, m)
    return members, valid


def distance_matrix_macs(reducer: KeepRateReducer, block: int, n_tokens: int, dim: int) -> int:
    """What a clustering step costs in matmuls: the one distance matrix, ``N²·C`` over the
    patch tokens (computed once per step; nothing when the step keeps every token)."""
    if not reducer.reduces_at(block):
        return 0
    n = n_tokens - (reducer.info.num_prefix if reducer.info else 1)
    return n * n * dim if reducer.num_kept(block, n) < n else 0
