"""ToFu, Token Fusion (Kim et al., WACV 2024, "Token Fusion: Bridging the Gap between Token
Pruning and Token Merging", arXiv 2312.01026): ToMe's matching, pruning early, MLERP late.

Written from the paper and the two public reimplementations (the authors released none):
github.com/hchautran/PiToMe ``algo/tofu/`` and github.com/Westlake-AI/OpenToMe
``opentome/timm/tofu.py`` with ``opentome/tome/tome.py``. In every block, between the
attention residual and the MLP:

1. ToMe's bipartite soft matching on the block's keys averaged over heads (imported from
   :mod:`methods.tome`: alternating sets, cosine similarity, the ``r`` best-matched A tokens
   become sources, prefix tokens protected), ``r`` per block from ToMe's schedule;
2. in the blocks before ``switch_block`` the sources are pruned (dropped; their destinations
   stay exactly as they were);
3. from ``switch_block`` on they are fused into their destinations by MLERP: the plain mean of
   a destination and its sources, rescaled to the largest norm among them,
   ``MLERP(x_1..x_k) = x̄ / ‖x̄‖ · max_i ‖x_i‖`` (norm-preserving, the paper's remedy for the
   shrinking norm of an average).

The paper picks the switch from a linearity analysis of the model (prune where the model
responds non-linearly to interpolated inputs, merge where it is near-linear); both
reimplementations fix it at "merge in blocks ``i > depth // 2``", so ``switch_block`` defaults
to ``depth // 2 + 1`` (block 7 of DeiT's 12).

Deviations from the references, each deliberate:

- MLERP divides by the norm of the mean, as the paper's formula says. OpenToMe divides the mean
  by the destination's own norm before the merge (``dst / dst_norm * max_norm``), and the
  PiToMe copy by an ``L_{-1}`` norm over the whole tensor (``torch.norm(x, -1)``); both read as
  slips, since neither gives the merged token the largest norm, which is the point of MLERP;
- the references track no sizes at all, so attention is never proportional: here sizes are
  tracked as bookkeeping (a fused token covers its members' patches, a pruned token's patches
  are gone) for the source map and size-weighted pooling, but do not weight the mean and do
  not reach attention unless ``prop_attn=True`` (the variant; off by default, as in the
  references);
- every prefix token is protected (OpenToMe protects the class and distillation tokens; the
  PiToMe copy the class token only); prefix tokens stay first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from methods.base import ModelInfo, ReducerConfigError, TokenState
from methods.tokens import group_counts, head_mean, keep_tokens, merge_every_token
from methods.tome import ToMe, bipartite_groups, bipartite_match


def prune_sources(state: TokenState, src_idx: Tensor) -> TokenState:
    """Drop the matched set-A tokens (``src_idx``, indices into set A, from
    :func:`~methods.tome.bipartite_match`), keep every other token bit for bit (in token order,
    prefix first). Needs no output slots: the prune steps skip building them."""
    b, n = state.size.shape
    is_src = torch.zeros(b, n, dtype=torch.uint8, device=src_idx.device).scatter_(1, 2 * src_idx, 1)
    order = is_src.argsort(dim=-1, stable=True)
    return keep_tokens(state, order[:, : n - src_idx.shape[1]])


def mlerp_merge(state: TokenState, group: Tensor, num_out: int) -> TokenState:
    """Fuse each slot's tokens by MLERP: their plain mean, rescaled to the largest norm among
    them (``x̄ / ‖x̄‖ · max ‖x_i‖``); a token alone in its slot is copied exactly. Sizes and
    source maps add up."""
    x = state.x
    mean, size, source = merge_every_token(state, group, num_out, weight=torch.ones_like(state.size))
    norms = x.float().norm(dim=-1)
    top = norms.new_zeros(x.shape[0], num_out).scatter_reduce_(1, group, norms, reduce="amax", include_self=False)
    scale = top / mean.float().norm(dim=-1).clamp_min(1e-12)
    # a token alone keeps scale 1: ``mean · 1`` is ``mean`` exactly (also through float32 and
    # back), and a (B, N) choice is cheaper than choosing between two (B, N, C) tensors
    scale = torch.where(group_counts(group, num_out) > 1, scale, 1.0)
    merged = (mean.float() * scale[..., None]).to(x.dtype)
    pos = torch.full(size.shape, -1, dtype=state.pos.dtype, device=size.device)
    return state.replace(x=merged, size=size, pos=pos, source=source, grid=None, reduced=True)


def tofu_step(state: TokenState, r: int, prune: bool) -> TokenState:
    """One ToFu step on a state whose ``keys`` tap is set: ToMe's matching, then prune or MLERP."""
    r = min(r, (int(state.num_tokens) - state.num_prefix) // 2)
    if r <= 0:
        return state
    metric = head_mean(state.keys)
    if prune:
        return prune_sources(state, bipartite_match(metric, r, state.num_prefix)[1])
    return mlerp_merge(state, *bipartite_groups(metric, r, state.num_prefix))


class ToFu(ToMe):
    """ToFu: ToMe's matching and schedule, pruning before ``switch_block``, MLERP from it on.

    Args:
        r: tokens removed in every block (the budget knob; a fraction is spread over the blocks
            so the average is exact), or a list with one count per block, as for ToMe.
        inflection: ToMe's linear schedule, from ``r(1-inflection)`` to ``r(1+inflection)``
            across the blocks; 0 keeps ``r`` constant.
        switch_block: the first block that merges (MLERP) instead of pruning; None is the
            references' ``depth // 2 + 1``; 0 merges everywhere, ``depth`` prunes everywhere.
        prop_attn: proportional attention (``log(size)`` on the logits); off, as in the
            references, which track no sizes.
    """

    def __init__(
        self,
        r: float | Sequence[int] = 13,
        inflection: float = 0.0,
        switch_block: int | None = None,
        prop_attn: bool = False,
    ) -> None:
        if switch_block is not None and (
            not isinstance(switch_block, int) or isinstance(switch_block, bool) or switch_block < 0
        ):
            raise ReducerConfigError(f"ToFu switch_block must be a non-negative integer or null, got {switch_block!r}")
        if not isinstance(prop_attn, bool):
            raise ReducerConfigError(f"ToFu prop_attn must be true or false, got {prop_attn!r}")
        super().__init__(r=r, inflection=inflection, prop_attn=prop_attn)
        self.hparams["switch_block"] = switch_block
        self.switch = 0

    def bind(self, info: ModelInfo) -> None:
        switch_block = self.hparams["switch_block"]
        if switch_block is not None and switch_block > info.depth:
            raise ReducerConfigError(
                f"ToFu switch_block={switch_block} is beyond the model's {info.depth} blocks (valid: 0..{info.depth})"
            )
        super().bind(info)
        self.switch = info.depth // 2 + 1 if switch_block is None else switch_block

    def reduce(self, state: TokenState, block: int) -> TokenState:
        return tofu_step(state, self.schedule[block], prune=block < self.switch)
