"""PPT (Wu, Zeng, Wang, Wang, Chen, "PPT: Token Pruning and Pooling for Efficient Vision
Transformers", arXiv 2310.01812, 2023): per image, prune inattentive tokens or pool duplicates.

Written from the paper and its reference code (github.com/xjwu1024/PPT, ``ppt_deit.py``:
``PPTAttention.score_assignment_step``, ``pp_block_adaptive``, ``apply_patch``, with the
ToMe ``bipartite_soft_matching`` / ``merge_wavg`` it imports, and ``main.py`` for the
defaults: ``--r_tokens 50 --pp_loc_list 3 6 9 --threshold 7e-5``, ``--prop_attn`` on).

In each reduction block (3, 6 and 9 by default), between the attention residual and the MLP,
with ``P`` prefix tokens and ``T = N − P`` other tokens:

1. importance ``s_i = (Σ_h A_h[cls, i]) · ‖v_i‖`` for every non-prefix token ``i``: the class
   token's attention summed over heads times the L2 norm of the token's value over all heads
   concatenated (ATS's score), normalised to ``Σ_i s_i = 1``;
2. the redundancy criterion ``σ² = Var(s)`` (unbiased, over the ``T`` scores), per image;
3. ``r`` tokens go in both branches (``r`` capped at ``T // 2``, ToMe's limit, as the reference):
   if ``σ² < threshold`` (flat scores: duplicative redundancy) the image is *pooled* by ToMe's
   bipartite soft matching on the keys averaged over heads (alternate tokens into A and B, the
   ``r`` A tokens most cosine-similar to their best B partner merge into it, size-weighted);
   otherwise (peaked scores: inattentive redundancy) the ``r`` lowest-scoring tokens are
   *pruned* and the rest kept in descending-score order (the reference's order, which the
   next block's A/B alternation sees);
4. sizes add up on merging and are kept on pruning; with ``prop_attn`` (the reference's default)
   later blocks add ``log(size)`` to the attention logits.

Both branches remove exactly ``r`` tokens, so the per-image choice is a ``torch.where`` between
two results of the same static shape: no host sync and one graph, and ``token_counts`` is exact.

Deviations from the reference, each deliberate:

- both branches are computed for every image and one is selected per image; the reference
  splits the batch with ``nonzero`` (a host sync and data-dependent shapes) and computes each
  branch on its sub-batch only. The outputs are the same; :meth:`PPT.overhead_macs` counts
  the matching similarities for every image;
- every prefix token (class, distillation, registers) is protected: left out of the scores,
  their normalisation and variance, the pruning and the merging. The reference protects only
  the class token from pruning (a distillation token is scored and may be pruned like a patch)
  and takes the variance over every token but the class token;
- models without a class token (average-pooled ViTs, which the reference does not support):
  the attention each token *receives*, averaged over queries and summed over heads, replaces
  the class token's row (needs the full attention map), as :mod:`methods.diffrate` does;
- ``r`` may be fractional (the budget knob): it is spread over the reduction blocks by
  cumulative rounding so the average is exactly ``r``; an integer ``r`` is the reference's
  (``r`` tokens in each reduction block), and a list gives one count per reduction block (the
  reference's ``parse_r`` list consumed in order by its reduction blocks);
- merging is always size-weighted and sizes are always tracked; the reference with
  ``prop_attn=False`` resets every size to 1 at each reduction block, so its merges there are
  plain means (this only touches the non-default ``prop_attn=False``);
- the score sort is stable (ties stay in token order); the reference's ``torch.sort`` is not;
- scores and ``‖v‖`` are computed in float32 whatever the model's dtype.

The threshold is an absolute bound on the variance of scores that sum to 1, as in the
reference; its scale depends on the token count (7e-5 was chosen for 196 patches).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from methods.base import (
    ATTN,
    CLS_ATTN,
    KEYS,
    VALUES,
    ModelInfo,
    ReducerConfigError,
    TokenReducer,
    TokenState,
    check_block_indices,
)
from methods.tokens import class_or_received_attention, head_mean, keep_tokens, merge_all, prefix_index
from methods.tome import bipartite_groups, half_caps

# -- the equations ------------------------------------------------------------------------------------


def importance_scores(attn_row: Tensor, values: Tensor, num_prefix: int) -> Tensor:
    """Normalised PPT/ATS importance ``(B, T)`` of the non-prefix tokens.

    ``attn_row`` is ``(B, H, N)``: per head, the attention the class token pays to each token
    (or, without a class token, the attention each token receives averaged over queries);
    ``values`` is ``(B, H, N, d)``. ``s_i = Σ_h attn_row[h, i] · ‖v_i‖`` with ``‖v_i‖`` the norm
    over all heads' values concatenated, then ``s / Σ s`` over the ``T = N − P`` tokens.
    """
    v = values.float()
    v_norm = v.square().sum(dim=(1, 3)).sqrt()  # (B, N): ‖concat_h v_h,i‖
    score = (attn_row.float().sum(dim=1) * v_norm)[:, num_prefix:]
    return score / score.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(score.dtype).tiny)


def score_variance(scores: Tensor) -> Tensor:
    """PPT's redundancy criterion ``(B,)``: the unbiased variance of each image's scores."""
    return scores.var(dim=-1)


def prune_lowest(state: TokenState, scores: Tensor, r: int) -> TokenState:
    """Drop the ``r`` lowest-scoring non-prefix tokens; prefix first, then the kept tokens in
    descending-score order (ties in token order)."""
    t = scores.shape[1]
    order = scores.argsort(dim=-1, descending=True, stable=True) + state.num_prefix
    return keep_tokens(state, torch.cat([prefix_index(state), order[:, : t - r]], dim=1))


def pool_matching(state: TokenState, r: int) -> TokenState:
    """ToMe's bipartite soft matching on the keys averaged over heads (size-weighted merge of
    ``r`` tokens): :func:`methods.tome.bipartite_groups` and :func:`methods.tokens.merge_all`."""
    group, num_out = bipartite_groups(head_mean(state.keys), r, state.num_prefix)
    return merge_all(state, group, num_out)


def select_per_image(first: Tensor, a: TokenState, b: TokenState) -> TokenState:
    """``a``'s tokens where ``first`` (B,) is true, ``b``'s elsewhere; both of the same shape."""
    pick = first[:, None]
    source = None
    if a.source is not None and b.source is not None:
        source = torch.where(pick[..., None], a.source, b.source)
    return a.replace(
        x=torch.where(pick[..., None], a.x, b.x),
        size=torch.where(pick, a.size, b.size),
        pos=torch.where(pick, a.pos, b.pos),
        source=source,
        grid=None,
        reduced=True,
    )


def ppt_step(state: TokenState, r: int, threshold: float) -> TokenState:
    """One PPT reduction on a state with its ``cls_attn`` (or ``attn``), ``keys`` and ``values``
    taps: ``r`` tokens pooled where the score variance is below ``threshold``, else pruned."""
    p = state.num_prefix
    r = min(int(r), (int(state.num_tokens) - p) // 2)
    if r <= 0:
        return state
    scores = importance_scores(class_or_received_attention(state), state.values, p)
    pooled = pool_matching(state, r)
    pruned = prune_lowest(state, scores, r)
    return select_per_image(score_variance(scores) < threshold, pooled, pruned)


def spread_r(r: float | Sequence[int], count: int) -> list[int]:
    """Tokens removed in each of ``count`` reduction blocks: a list as given, a number spread
    by cumulative rounding (an integer ``r`` in every block)."""
    if isinstance(r, Sequence) and not isinstance(r, str):
        return [int(v) for v in r]
    return [round((i + 1) * r) - round(i * r) for i in range(count)]


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# -- the reducer --------------------------------------------------------------------------------------


class PPT(TokenReducer):
    """PPT: in each reduction block, per image, prune the ``r`` least important tokens when the
    importance scores are peaked, or pool ``r`` tokens by bipartite soft matching when they are flat.

    ``token_counts`` is exact: every image loses the same ``r`` tokens (capped at half the
    non-prefix tokens, as ToMe and the reference cap it), whichever branch it takes.

    Args:
        blocks: indices of the reduction blocks (0-based, strictly increasing); the reference's
            ``pp_loc_list`` ``[3, 6, 9]``.
        r: tokens removed in each reduction block (the budget knob; the reference's ``r_tokens``
            50). A fraction is spread over the blocks so the average is exact; a list gives one
            count per reduction block.
        threshold: the score variance below which an image is pooled rather than pruned (the
            reference's 7e-5 for DeiT-S; ``0`` always prunes, ``.inf`` always pools); >= 0.
        prop_attn: proportional attention (``log(size)`` on the logits) once tokens were merged;
            on in the reference (``main.py``'s ``--prop_attn`` is a ``store_false`` flag).
    """

    budget_knob = "r"
    budget_range = (0.0, 150.0)

    def __init__(
        self,
        blocks: Sequence[int] = (3, 6, 9),
        r: float | Sequence[int] = 50,
        threshold: float = 7e-5,
        prop_attn: bool = True,
    ) -> None:
        if isinstance(blocks, int) and not isinstance(blocks, bool):
            blocks = [blocks]
        if isinstance(blocks, str) or not isinstance(blocks, Sequence):
            raise ReducerConfigError(f"PPT blocks must be a list of block indices, got {blocks!r}")
        for b in blocks:
            if not isinstance(b, int) or isinstance(b, bool) or b < 0:
                raise ReducerConfigError(f"PPT reduction block index {b!r} must be a non-negative integer")
        if list(blocks) != sorted(set(blocks)):
            raise ReducerConfigError(f"PPT blocks must be strictly increasing, got {list(blocks)}")
        if isinstance(r, Sequence) and not isinstance(r, str):
            r = list(r)
            if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in r):
                raise ReducerConfigError(f"PPT r must hold non-negative integers, got {r}")
            if len(r) != len(blocks):
                raise ReducerConfigError(f"PPT r has {len(r)} values but there are {len(blocks)} reduction blocks")
        elif not _is_number(r) or not 0 <= r < math.inf:
            raise ReducerConfigError(f"PPT r (tokens removed per reduction block) must be a number >= 0, got {r!r}")
        if not _is_number(threshold) or math.isnan(threshold) or threshold < 0:
            raise ReducerConfigError(f"PPT threshold (a score variance) must be a number >= 0, got {threshold!r}")
        if not isinstance(prop_attn, bool):
            raise ReducerConfigError(f"PPT prop_attn must be true or false, got {prop_attn!r}")
        super().__init__(blocks=list(blocks), r=r, threshold=threshold, prop_attn=prop_attn)
        self.blocks: list[int] = list(blocks)
        self.threshold = float(threshold)
        self.r_at: dict[int, int] = dict(zip(self.blocks, spread_r(r, len(self.blocks)), strict=True))

    def bind(self, info: ModelInfo) -> None:
        check_block_indices(self.blocks, info.depth)
        super().bind(info)

    def notes(self) -> list[str]:
        """Blocks where ``r`` exceeds half the non-prefix tokens: capped there, as the reference caps it."""
        if self.info is None:
            return []
        p = self.info.num_prefix
        capped = half_caps(((block, self.r_at[block]) for block in self.blocks), self.info.num_patches)
        if not capped:
            return []
        b, r, can = capped[0]
        return [
            f"r capped in {len(capped)} of {len(self.blocks)} reduction blocks (first: block {b} removes {can} of "
            f"the {r} asked; a block can remove at most half its {'non-prefix ' if p else ''}tokens)"
        ]

    def reduces_at(self, block: int) -> bool:
        return self.r_at.get(block, 0) > 0

    def needs(self, block: int) -> frozenset[str]:
        if self.info is not None and self.info.num_prefix == 0:
            return frozenset({ATTN, KEYS, VALUES})
        return frozenset({CLS_ATTN, KEYS, VALUES})

    def reduce(self, state: TokenState, block: int) -> TokenState:
        return ppt_step(state, self.r_at[block], self.threshold)

    def token_counts(self, num_prefix: int, num_patches: int, depth: int) -> list[tuple[int, int]]:
        n = num_prefix + num_patches
        counts = []
        for block in range(depth):
            out = n - max(0, min(self.r_at.get(block, 0), (n - num_prefix) // 2))
            counts.append((n, out))
            n = out
        return counts

    def overhead_macs(self, block: int, n_tokens: int, dim: int, heads: int) -> int:
        """The class token's attention row (``q_cls·K``, on the fused path; none without a class
        token, whose full map is the block's own attention) and the matching's similarities of
        set A against set B on head-averaged keys, ``ceil(N/2)·floor(N/2)·d_head``, for every image."""
        if not self.reduces_at(block):
            return 0
        prefix = self.info.num_prefix if self.info else 1
        row = n_tokens * dim if prefix > 0 else 0
        if min(self.r_at[block], (n_tokens - prefix) // 2) <= 0:
            return row
        return row + math.ceil(n_tokens / 2) * (n_tokens // 2) * (dim // heads)
