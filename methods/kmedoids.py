"""K-medoids clustering baseline (as in Marin et al. 2021 and Haurum et al. 2023).

At each reduction block the N patch tokens are clustered into ``K = ceil(keep_rate * N)``
groups by their features (``state.x``) and every cluster becomes one token, the size-weighted
mean of its members. Prefix tokens are not clustered and stay first.

The clustering, batched over images (the only Python loop is over the iterations):

- distances: the Euclidean distance matrix between the patch tokens, computed once as one
  matmul ``x @ x^T`` (``N²·C`` multiply-accumulates, the whole cost counted by
  :meth:`KMedoids.overhead_macs`); everything after it is gathers and reductions;
- initialisation (deterministic): ``K`` evenly spaced token indices,
  ``floor(i * N / K)`` for ``i < K``; on a fresh grid these are spread over the image;
- ``iters`` Voronoi iterations: assign every token to its nearest medoid (each medoid to
  itself), then move every medoid to the member with the smallest size-weighted sum of
  distances to the other members of its cluster (ties: lowest token index);
- a final assignment to the final medoids; clusters are output in medoid-index order.

Medoids stay distinct and each owns itself, so no cluster is ever empty.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from methods.base import KeepRateReducer, ReducerConfigError, TokenState
from methods.grouping import (
    assign_to_centres,
    cluster_members,
    distance_matrix_macs,
    merge_patch_groups,
    pairwise_sq_distances,
)


def evenly_spaced(n: int, k: int, batch: int, device: torch.device) -> Tensor:
    """``k`` distinct indices spread evenly over ``0..n-1``, shape (batch, k)."""
    return (torch.arange(k, device=device) * n // k).expand(batch, -1)


def update_medoids(dist: Tensor, weight: Tensor, group: Tensor, k: int) -> Tensor:
    """New medoid of every cluster: the member minimising the weighted distance to its cluster.

    ``dist`` (B, N, N), ``weight`` (B, N) float, ``group`` (B, N) in ``[0, k)`` with every
    cluster non-empty. Only distances within clusters are read. Returns the medoids' token
    indices (B, k), sorted.
    """
    b, n = group.shape
    members, valid = cluster_members(group, k)
    w = torch.where(valid, weight.gather(1, members.view(b, -1)).view(members.shape), 0.0)
    cost = (dist.gather(2, members) * w).sum(-1)
    best = torch.full((b, k), float("inf"), device=cost.device).scatter_reduce(
        1, group, cost, reduce="amin", include_self=True
    )
    idx = torch.arange(n, device=cost.device).expand(b, -1)
    cand = torch.where(cost == best.gather(1, group), idx, torch.full_like(idx, n))
    medoids = torch.full((b, k), n, device=cost.device, dtype=idx.dtype)
    medoids = medoids.scatter_reduce(1, group, cand, reduce="amin", include_self=True)
    return medoids.sort(dim=-1).values


def kmedoids_groups(x: Tensor, weight: Tensor, k: int, iters: int) -> Tensor:
    """Cluster index (B, N) in ``[0, k)`` of every row of ``x`` (B, N, C)."""
    b, n, _ = x.shape
    dist = pairwise_sq_distances(x).sqrt_()
    weight = weight.float()
    medoids = evenly_spaced(n, k, b, x.device)
    for _ in range(iters):
        group = assign_to_centres(dist, medoids)
        medoids = update_medoids(dist, weight, group, k)
    return assign_to_centres(dist, medoids)


def kmedoids_reduce(state: TokenState, k: int, iters: int) -> TokenState:
    """One k-medoids step: ``k`` clusters over the patch tokens of ``state``."""
    p = state.num_prefix
    n = state.num_tokens - p
    if k >= n:
        return state
    group = kmedoids_groups(state.x[:, p:], state.size[:, p:], k, iters)
    return merge_patch_groups(state, group, k)


class KMedoids(KeepRateReducer):
    """K-medoids merging of the patch tokens at the reduction blocks.

    Args:
        blocks: indices of the blocks that reduce (0-based, strictly increasing).
        keep_rate: fraction of the patch tokens kept at each of them, ``ceil(keep_rate * N)``;
            one number for every block or one per block (the budget knob); ``K`` clusters.
        iters: Voronoi iterations after the evenly spaced initialisation (0: the initial medoids).
        prop_attn: proportional attention, so a cluster token counts for its members.
    """

    def __init__(
        self,
        blocks: Sequence[int] = (3, 6, 9),
        keep_rate: float | Sequence[float] = 0.7,
        iters: int = 5,
        prop_attn: bool = True,
    ) -> None:
        if not isinstance(iters, int) or isinstance(iters, bool) or iters < 0:
            raise ReducerConfigError(f"kmedoids iters must be a non-negative integer, got {iters!r}")
        super().__init__(blocks=blocks, keep_rate=keep_rate, iters=iters, prop_attn=prop_attn)
        self.iters = iters

    def reduce(self, state: TokenState, block: int) -> TokenState:
        k = self.num_kept(block, state.num_tokens - state.num_prefix)
        return kmedoids_reduce(state, k, self.iters)

    def overhead_macs(self, block: int, n_tokens: int, dim: int, heads: int) -> int:
        return distance_matrix_macs(self, block, n_tokens, dim)
