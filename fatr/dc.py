"""DC tokens: the low-frequency tokens of each local window, kept as one size-weighted mean.

The original patch grid is split into ``w x w`` windows (``dc_grid``). A DC token stands for
the zero-frequency content of its window, so low-frequency tokens are compressed rather than
discarded. Later reductions merge new low-frequency tokens into the existing DC token of their
window; a coarser ``dc_grid`` merges the finer windows it contains.
"""

from __future__ import annotations

import torch
from torch import Tensor


def window_of(pos: Tensor, patch_grid: tuple[int, int], w: int) -> Tensor:
    """Window index in ``[0, w*w)`` of each original patch index ``pos`` (row-major windows)."""
    rows, cols = patch_grid
    r, c = pos // cols, pos % cols
    return (r * w // rows) * w + (c * w // cols)


def coarsen_windows(w_from: int, w_to: int, device: torch.device) -> Tensor:
    """Index of the ``w_to`` window containing each of the ``w_from x w_from`` windows."""
    i = torch.arange(w_from * w_from, device=device)
    r, c = i // w_from, i % w_from
    return (r * w_to // w_from) * w_to + (c * w_to // w_from)


def check_dc_grids(grids: list[int], patch_grid: tuple[int, int] | None = None) -> None:
    """Each ``dc_grid`` must be positive and nest in the previous one (coarser or equal)."""
    from methods.base import ReducerConfigError

    for i, w in enumerate(grids):
        if not isinstance(w, int) or isinstance(w, bool) or w < 1:
            raise ReducerConfigError(f"dc_grid must be a positive integer, got {w!r}")
        if i and grids[i - 1] % w:
            raise ReducerConfigError(
                f"dc_grid {w} at a later block does not nest in the earlier {grids[i - 1]}: "
                "later grids must divide earlier ones"
            )
        if patch_grid is not None and (w > patch_grid[0] or w > patch_grid[1]):
            raise ReducerConfigError(f"dc_grid {w} is finer than the {patch_grid[0]}x{patch_grid[1]} patch grid")
