"""EViT (Liang et al., ICLR 2022): keep the tokens the class token attends to, fuse the rest.

At each reduction block the ``ceil(keep_rate * (N - P))`` non-prefix tokens with the highest
class-token attention (averaged over heads) are kept; the inattentive rest is fused into one
token, the sum of those tokens weighted by their class attention (not renormalised, as in the
paper), appended at the end. At the next reduction block the fused token competes like any
other token, so keep rates compound. ``fuse=False`` drops the inattentive tokens instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from methods.base import CLS_ATTN, KeepRateReducer, ModelInfo, ReducerConfigError, TokenState
from methods.tokens import batch_gather, concat_states, keep_tokens, prefix_index


def attentive_split(score: Tensor, num_prefix: int, keep: int) -> tuple[Tensor, Tensor]:
    """Indices (over all tokens) of the ``keep`` highest-scoring non-prefix tokens, in token
    order, and of the rest. ``score`` is (B, N) and ignores its prefix entries."""
    cand = score[:, num_prefix:]
    order = cand.argsort(dim=-1, descending=True) + num_prefix
    kept = order[:, :keep].sort(dim=-1).values
    dropped = order[:, keep:]
    return kept, dropped


def evit_reduce(state: TokenState, keep: int, fuse: bool) -> TokenState:
    """One EViT step on a state whose ``cls_attn`` tap is set."""
    score = state.cls_attn.mean(dim=1)
    kept, dropped = attentive_split(score, state.num_prefix, keep)
    idx = torch.cat([prefix_index(state), kept], dim=1)
    out = keep_tokens(state, idx)
    if not fuse or dropped.shape[1] == 0:
        return out
    w = batch_gather(score, dropped)
    x_fused = (batch_gather(state.x, dropped) * w[..., None].to(state.x.dtype)).sum(1, keepdim=True)
    size_fused = batch_gather(state.size, dropped).sum(1, keepdim=True)
    pos_fused = torch.full_like(size_fused, -1, dtype=state.pos.dtype)
    src_fused = None
    if state.source is not None:
        src_fused = batch_gather(state.source, dropped).sum(1, keepdim=True)
    return concat_states(out, [(out.x, out.size, out.pos, out.source), (x_fused, size_fused, pos_fused, src_fused)])


class EViT(KeepRateReducer):
    """EViT with fusion (``fuse=True``, the paper's method) or plain top-k pruning.

    Args:
        blocks: indices of the blocks that reduce (0-based, strictly increasing).
        keep_rate: fraction of the patch tokens kept at each of them, ``ceil(keep_rate * N)``;
            one number for every block or one per block (the budget knob).
        fuse: fuse the inattentive tokens into one (the paper) rather than drop them.
        prop_attn: proportional attention once tokens were fused (off, as in the paper).
    """

    def __init__(
        self,
        blocks: Sequence[int] = (3, 6, 9),
        keep_rate: float | Sequence[float] = 0.7,
        fuse: bool = True,
        prop_attn: bool = False,
    ) -> None:
        super().__init__(blocks=blocks, keep_rate=keep_rate, fuse=fuse, prop_attn=prop_attn)
        self.fuse = fuse

    def bind(self, info: ModelInfo) -> None:
        if info.num_prefix < 1:
            raise ReducerConfigError("EViT ranks tokens by class-token attention; this model has no class token")
        super().bind(info)

    def needs(self, block: int) -> frozenset[str]:
        return frozenset({CLS_ATTN})

    def reduce(self, state: TokenState, block: int) -> TokenState:
        keep = self.num_kept(block, state.num_tokens - state.num_prefix)
        return evit_reduce(state, keep, self.fuse)

    def count_step(self, block: int, special: int, patch: int) -> tuple[int, int]:
        kept = self.num_kept(block, patch)
        return special, kept + (1 if self.fuse and kept < patch else 0)

    def overhead_macs(self, block: int, n_tokens: int, dim: int, heads: int) -> int:
        """The class-token attention row: ``q_cls · K`` for every head."""
        return n_tokens * dim if self.reduces_at(block) else 0
