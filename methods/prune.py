"""Pruning baselines: drop patch tokens, merge nothing.

- ``topk``: keep the ``ceil(keep_rate * N)`` patch tokens with the highest class-token
  attention and drop the rest: EViT without its fused token (it *is* :class:`EViT` with
  ``fuse=False``).
- ``random``: keep a uniformly random subset of the same size. The generator is seeded on
  every call from ``seed`` and the block index, so the same input gives the same output, and
  the draw is made on the CPU so it is the same on every device.

Kept tokens are copied exactly with their sizes, so the sizes' sum drops and the source map
becomes a subset of the grid. Proportional attention is off by default (sizes stay 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

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


def random_generator(seed: int, block: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, block)``: one fixed stream per reduction block."""
    return torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + block) % (2**63))


def random_keep(state: TokenState, keep: int, generator: torch.Generator) -> TokenState:
    """Keep ``keep`` uniformly random patch tokens per image (in token order) and the prefix."""
    b, p = state.x.shape[0], state.num_prefix
    n = state.num_tokens - p
    if keep >= n:
        return state
    keys = torch.rand(b, n, generator=generator)
    kept = keys.topk(keep, dim=-1).indices.sort(dim=-1).values.to(state.x.device) + p
    return keep_tokens(state, torch.cat([prefix_index(state), kept], dim=1))


class RandomPrune(KeepRateReducer):
    """Uniform random pruning of the patch tokens at the reduction blocks (seeded).

    Args:
        blocks: indices of the blocks that reduce (0-based, strictly increasing).
        keep_rate: fraction of the patch tokens kept at each of them, ``ceil(keep_rate * N)``;
            one number for every block or one per block (the budget knob).
        seed: seed of the choice, drawn afresh per block from ``(seed, block)``: the same
            tokens for the same input on every run, independent of any global RNG.
        prop_attn: proportional attention (off: pruned tokens all stand for one patch).
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

    def reduce(self, state: TokenState, block: int) -> TokenState:
        keep = self.num_kept(block, state.num_tokens - state.num_prefix)
        return random_keep(state, keep, random_generator(self.seed, block))
