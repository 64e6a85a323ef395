"""Spatial pooling baseline: average the patch-token grid down to a smaller grid.

At each reduction block the patch tokens (row-major on ``state.grid``, h x w) are pooled to an
h' x w' grid whose size is the closest achievable to ``ceil(keep_rate * h * w)``: every
h' <= h, w' <= w is searched, ties go to the aspect ratio closest to the current one, then to
the larger grid, then to the fewer rows. Matching the count exactly comes first because budget
matching needs fine steps (a squarer rule, e.g. 14x14 -> 12x12 at keep 0.7, cannot reach
macs_ratio 0.65 within 2%); the price is that a step may pool along one axis only (14x14 ->
10x14). Row ``r`` goes to output row ``floor(r * h' / h)``
(columns alike), so the bins tile the grid without overlap and none is empty. Each bin becomes
the size-weighted mean of its tokens. The new grid is recorded in ``state.grid``, so a later
pooling block pools the pooled grid. Prefix tokens are copied in front untouched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from methods.base import KeepRateReducer, ModelInfo, ReducerConfigError, TokenState
from methods.grouping import merge_patch_groups
from methods.tokens import shape_constant


def known_grid(info: ModelInfo | None, num_patches: int) -> tuple[int, int] | None:
    """The patch grid ``num_patches`` patches lie on: the bound model's when the count is its
    own, else a square one; None when neither tells (a reducer must be bound first)."""
    if info is not None and info.num_patches == num_patches:
        return info.patch_grid
    s = math.isqrt(num_patches)
    return (s, s) if s * s == num_patches else None


@shape_constant(maxsize=1024)
def pooled_grid(h: int, w: int, target: int) -> tuple[int, int]:
    """The h' x w' grid (h' <= h, w' <= w) with h'·w' closest to ``target`` (see module doc).

    Every reduction block asks again, and the search costs ~150 µs in Python (14x14), about 1%
    of a DeiT-Tiny forward at batch 1 per block: cached (:func:`methods.tokens.shape_constant`;
    traced while ``torch.compile`` traces, the graph keeping the answer as a constant)."""
    aspect = math.log(h / w)

    def key(hw: tuple[int, int]) -> tuple[int, float, int, int]:
        a, b = hw
        return abs(a * b - target), round(abs(math.log(a / b) - aspect), 9), -(a * b), a

    # A plain loop, not ``min(..., key=key)``: torch 2.11's dynamo breaks the graph at a builtin
    # called with ``key=`` (2.14's does not), and this is traced in the compiled forward.
    best, best_key = (h, w), key((h, w))
    for a in range(1, h + 1):
        for b in range(1, w + 1):
            k = key((a, b))
            if k < best_key:
                best, best_key = (a, b), k
    return best


@shape_constant()
def pool_groups(grid: tuple[int, int], out: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Output bin (row-major on ``out``) of every token of ``grid`` (row-major), shape (h*w,)."""
    (h, w), (ho, wo) = grid, out
    rows = torch.arange(h, device=device) * ho // h
    cols = torch.arange(w, device=device) * wo // w
    return (rows[:, None] * wo + cols[None, :]).flatten()


def current_grid(state: TokenState) -> tuple[int, int]:
    """The grid the patch tokens of ``state`` lie on; a clear error when the layout is lost."""
    if state.grid is None:
        raise ReducerConfigError(
            "pool needs the patch tokens laid out on a grid, but state.grid is None "
            "(an earlier reduction lost the layout)"
        )
    h, w = state.grid
    n = state.num_tokens - state.num_prefix
    if h * w != n:
        raise ReducerConfigError(f"pool: {n} patch tokens do not fill the {h}x{w} grid")
    return h, w


def pool_reduce(state: TokenState, out: tuple[int, int]) -> TokenState:
    """Pool the patch tokens of ``state`` (laid out on ``state.grid``) to the ``out`` grid."""
    h, w = current_grid(state)
    if tuple(out) == (h, w):
        return state
    group = pool_groups((h, w), tuple(out), state.x.device).expand(state.x.shape[0], -1)
    return merge_patch_groups(state, group, out[0] * out[1], grid=(out[0], out[1]))


class Pool(KeepRateReducer):
    """Average pooling of the patch grid at the reduction blocks (size-weighted).

    Args:
        blocks: indices of the blocks that reduce (0-based, strictly increasing).
        keep_rate: fraction of the patch tokens kept at each of them, ``ceil(keep_rate * N)``;
            one number for every block or one per block (the budget knob); the pooled grid
            matches that count as closely as a grid can.
        prop_attn: proportional attention, so a pooled token counts for the patches it covers.
    """

    def __init__(
        self,
        blocks: Sequence[int] = (3, 6, 9),
        keep_rate: float | Sequence[float] = 0.7,
        prop_attn: bool = True,
    ) -> None:
        super().__init__(blocks=blocks, keep_rate=keep_rate, prop_attn=prop_attn)

    def target_grid(self, block: int, grid: tuple[int, int]) -> tuple[int, int]:
        h, w = grid
        return pooled_grid(h, w, self.num_kept(block, h * w))

    def reduce(self, state: TokenState, block: int) -> TokenState:
        return pool_reduce(state, self.target_grid(block, current_grid(state)))

    def _start_grid(self, num_patches: int) -> tuple[int, int]:
        grid = known_grid(self.info, num_patches)
        if grid is not None:
            return grid
        raise ReducerConfigError(
            f"pool cannot tell the grid layout of {num_patches} patches; bind the reducer to the model first"
        )

    def grids(self, num_patches: int, depth: int) -> list[tuple[int, int]]:
        """Grid of the patch tokens leaving each block."""
        grid = self._start_grid(num_patches)
        out = []
        for b in range(depth):
            if self.reduces_at(b):
                grid = self.target_grid(b, grid)
            out.append(grid)
        return out

    def count_step(self, block: int, special: int, patch: int) -> tuple[int, int]:
        # The count depends on the grid's shape, not only on its size: replay the schedule.
        grid = self._start_grid_for(block, patch)
        h, w = self.target_grid(block, grid)
        return special, h * w

    def _start_grid_for(self, block: int, patch: int) -> tuple[int, int]:
        """Grid entering ``block`` when ``patch`` tokens enter it, replayed from the model grid."""
        if self.info is not None:
            grid = self.info.patch_grid
            for b in range(block):
                if self.reduces_at(b):
                    grid = self.target_grid(b, grid)
            if grid[0] * grid[1] == patch:
                return grid
        return self._start_grid(patch)

    def token_counts(self, num_prefix: int, num_patches: int, depth: int) -> list[tuple[int, int]]:
        counts, n = [], num_prefix + num_patches
        for h, w in self.grids(num_patches, depth):
            counts.append((n, num_prefix + h * w))
            n = num_prefix + h * w
        return counts
