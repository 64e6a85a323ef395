"""Pruning baselines: drop patch tokens, merge nothing.

- ``topk``: keep the ``ceil(keep_rate * N)`` patch tokens with the highest class-token
  attention and drop the rest: EViT without its fused token (it *is* :class:`EViT` with
  ``fuse=False``).
- ``random``: keep a uniformly random subset of the same size. The subset depends only on
  ``seed``, the block and the image's position in its batch (a CPU generator seeded from
  ``(seed, block)`` fills one row of keys per position), never on the image, so it is drawn
  once, by :meth:`RandomPrune.prepare`, into a table of kept indices per batch position: a
  forward then holds no random draw, no host work and no device sync (``torch.compile``
  captures it whole), and keeps the same tokens on every device.

Kept tokens are copied exactly with their sizes, so the sizes' sum drops and the source map
becomes a subset of the grid. Proportional attention is off by default (sizes stay 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from methods.base import KeepRateReducer, ReducerConfigError, TokenState
from methods.evit import EViT
from methods.tokens import keep_tokens, prefix_index


class TopK(EViT):
    """Class-attention top-k pruning (EViT with ``fuse=False``).

    Args:
        blocks: indices of the blocks that reduce (0-based, strictly increasing).
        keep_rate: fraction of the patch tokens kept at each of them, ``ceil(keep_rate * N)``;
            one number for every block or one per block (the budget knob).
        prop_attn: proportional attention (off: pruned tokens all stand for one patch).
    """

    def __init__(
        self,
        blocks: Sequence[int] = (3, 6, 9),
        keep_rate: float | Sequence[float] = 0.7,
        prop_attn: bool = False,
    ) -> None:
        super().__init__(blocks=blocks, keep_rate=keep_rate, fuse=False, prop_attn=prop_attn)
        del self.hparams["fuse"]  # not an argument of this class (with_knob rebuilds from hparams)


KEPT_ROWS = 1024
"""Batch positions the kept-index tables cover when first drawn (a larger batch redraws them)."""


def random_generator(seed: int, block: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, block)``: one fixed stream per reduction block."""
    return torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + block) % (2**63))


def random_kept(seed: int, block: int, rows: int, n: int, keep: int) -> Tensor:
    """Kept patch indices ``(rows, keep)``, in token order, for batch positions ``0..rows-1``.

    Row ``i`` is the ``i``-th block of ``n`` uniform keys of the ``(seed, block)`` stream and
    keeps its ``keep`` largest, so it is the same for any ``rows > i``: exactly what drawing
    ``torch.rand(batch, n)`` afresh in every forward kept for the image at position ``i``.
    """
    keys = torch.rand(rows, n, generator=random_generator(seed, block))
    return keys.topk(keep, dim=-1).indices.sort(dim=-1).values


def random_keep(state: TokenState, kept: Tensor) -> TokenState:
    """Keep the patch tokens at ``kept`` (B, K) (patch indices, token order) and the prefix."""
    idx = torch.cat([prefix_index(state), kept + state.num_prefix], dim=1)
    return keep_tokens(state, idx)


class RandomPrune(KeepRateReducer):
    """Uniform random pruning of the patch tokens at the reduction blocks (seeded).

    Args:
        blocks: indices of the blocks that reduce (0-based, strictly increasing).
        keep_rate: fraction of the patch tokens kept at each of them, ``ceil(keep_rate * N)``;
            one number for every block or one per block (the budget knob).
        seed: seed of the choice, one stream per block from ``(seed, block)``: the same
            tokens for the same batch position on every run, independent of any global RNG.
        prop_attn: proportional attention (off: pruned tokens all stand for one patch).

    The kept indices of each reduction block are a buffer ``kept_<block>`` ``(rows, keep)``
    (not saved with the model; ``.to()`` moves it), drawn by :meth:`prepare` (from
    :func:`methods.apply_reducer`) for the model's own patch grid. Another token count, a batch
    of more than ``rows`` images or another device redraws it in that (eager) forward, the one
    place left with host work.
    """

    def __init__(
        self,
        blocks: Sequence[int] = (3, 6, 9),
        keep_rate: float | Sequence[float] = 0.7,
        seed: int = 0,
        prop_attn: bool = False,
    ) -> None:
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ReducerConfigError(f"random seed must be a non-negative integer, got {seed!r}")
        super().__init__(blocks=blocks, keep_rate=keep_rate, seed=seed, prop_attn=prop_attn)
        self.seed = seed
        self._kept_n: dict[int, int] = {}  # patch tokens each block's table was drawn for

    def prepare(self, device: torch.device) -> None:
        """Draw the kept-index tables for the bound model's patch grid on ``device``."""
        if self.info is None:
            return
        counts = self.token_counts(self.info.num_prefix, self.info.num_patches, self.info.depth)
        for block in self.blocks:
            self._draw(block, counts[block][0] - self.info.num_prefix, KEPT_ROWS, device)

    def _draw(self, block: int, n: int, rows: int, device: torch.device) -> Tensor:
        """Draw block ``block``'s table for ``n`` patch tokens and ``rows`` batch positions."""
        kept = random_kept(self.seed, block, rows, n, self.num_kept(block, n)).to(device)
        self.register_buffer(f"kept_{block}", kept, persistent=False)
        self._kept_n[block] = n
        return kept

    def kept(self, block: int, n: int, batch: int, device: torch.device) -> Tensor:
        """Kept patch indices ``(batch, keep)`` of block ``block`` for ``n`` patch tokens."""
        table = getattr(self, f"kept_{block}", None)
        if table is None or self._kept_n.get(block) != n or table.shape[0] < batch or table.device != device:
            table = self._draw(block, n, max(batch, KEPT_ROWS), device)
        return table[:batch]

    def reduce(self, state: TokenState, block: int) -> TokenState:
        n = state.num_tokens - state.num_prefix
        if self.num_kept(block, n) >= n:
            return state
        return random_keep(state, self.kept(block, n, state.x.shape[0], state.x.device))
