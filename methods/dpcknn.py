"""DPC-kNN baseline: density-peak clustering with k nearest neighbours.

The clustering of TCFormer (Zeng et al., CVPR 2022), used as a reduction baseline by Haurum
et al. (2023). At each reduction block, over the N patch tokens (prefix tokens excluded):

- ``d``: Euclidean distances between the tokens' features divided by ``sqrt(C)`` (as in
  TCFormer), from one matmul ``x @ x^T`` (``N²·C`` multiply-accumulates, see :meth:`DPCKNN.overhead_macs`);
- local density ``rho = exp(-mean of d² to the k nearest tokens)``; as in TCFormer the token
  itself (distance 0) is one of its k nearest;
- ``delta``: distance to the nearest token of higher density; the densest token gets the
  largest distance in the image. Equal densities are ordered by token index (the lower index
  counts as denser), an exact tie-break in place of TCFormer's random noise;
- score ``rho * delta``; the ``K = ceil(keep_rate * N)`` best-scoring tokens are the centres
  (ranked in log space, ``log rho + log delta``, so tiny densities do not underflow to ties;
  equal scores: lower index first);
- every token joins its nearest centre (each centre itself), and each cluster becomes the
  size-weighted mean of its members, output in centre-index order.

Everything is batched over images; the only Python loop is over the ``k - 1`` neighbours.
The work is done on squared distances (no square root of the N x N matrix): the k nearest,
the densities, the nearest denser token and the assignment do not change.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from methods.base import KeepRateReducer, ReducerConfigError, TokenState
from methods.grouping import assign_to_centres, distance_matrix_macs, merge_patch_groups, pairwise_sq_distances


def knn_sum(d2: Tensor, k: int) -> Tensor:
    """Sum over every row of ``d2`` (B, N, N), zero diagonal, of its ``k`` smallest entries.

    The token itself (0) is the first; the other ``k - 1`` are taken out one at a time (min,
    then masked), which on CPU is about twice as fast as ``topk`` for small ``k``. Equal values
    are taken one by one, so the sum is exactly that of the ``k`` smallest.
    """
    rest = d2.clone()
    rest.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    total = torch.zeros_like(d2[:, :, 0])
    for _ in range(k - 1):
        nearest, idx = rest.min(dim=-1)
        total += nearest
        rest.scatter_(2, idx[..., None], float("inf"))
    return total


def density_peak_centres(d2: Tensor, k_neighbours: int, num_centres: int) -> Tensor:
    """Indices (B, K), sorted, of the density-peak centres given squared distances (B, N, N).

    Works on squared distances throughout (the k nearest, the densities and the nearest denser
    token do not change) and takes square roots only of the per-token results.
    """
    b, n, _ = d2.shape
    k = min(k_neighbours, n)
    log_rho = -knn_sum(d2, k) / k
    # Rank by density, equal densities by token index: rank 0 is the densest token.
    order = log_rho.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=d2.device).expand(b, -1))
    not_denser = rank[:, None, :] >= rank[:, :, None]
    nearest_denser = torch.where(not_denser, float("inf"), d2).amin(-1)
    farthest = d2.flatten(1).amax(-1, keepdim=True)
    delta2 = torch.where(rank == 0, farthest, nearest_denser)
    log_score = log_rho + 0.5 * delta2.log()
    best = log_score.argsort(dim=-1, descending=True, stable=True)
    return best[:, :num_centres].sort(dim=-1).values


def dpcknn_reduce(state: TokenState, num_centres: int, k_neighbours: int) -> TokenState:
    """One DPC-kNN step: ``num_centres`` clusters over the patch tokens of ``state``."""
    p = state.num_prefix
    x = state.x[:, p:]
    n, c = x.shape[1], x.shape[2]
    if num_centres >= n:
        return state
    d2 = pairwise_sq_distances(x).div_(c)
    centres = density_peak_centres(d2, k_neighbours, num_centres)
    group = assign_to_centres(d2, centres)
    return merge_patch_groups(state, group, num_centres)


class DPCKNN(KeepRateReducer):
    """Density-peak (DPC-kNN) clustering merge of the patch tokens at the reduction blocks.

    Args:
        blocks: indices of the blocks that reduce (0-based, strictly increasing).
        keep_rate: fraction of the patch tokens kept at each of them, ``ceil(keep_rate * N)``;
            one number for every block or one per block (the budget knob); ``K`` cluster centres.
        k: nearest neighbours (the token itself included) that define each token's density.
        prop_attn: proportional attention, so a cluster token counts for its members.
    """

    def __init__(
        self,
        blocks: Sequence[int] = (3, 6, 9),
        keep_rate: float | Sequence[float] = 0.7,
        k: int = 5,
        prop_attn: bool = True,
    ) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ReducerConfigError(f"dpcknn k (nearest neighbours) must be a positive integer, got {k!r}")
        super().__init__(blocks=blocks, keep_rate=keep_rate, k=k, prop_attn=prop_attn)
        self.k = k

    def reduce(self, state: TokenState, block: int) -> TokenState:
        n = self.num_kept(block, state.num_tokens - state.num_prefix)
        return dpcknn_reduce(state, n, self.k)

    def overhead_macs(self, block: int, n_tokens: int, dim: int, heads: int) -> int:
        return distance_matrix_macs(self, block, n_tokens, dim)
