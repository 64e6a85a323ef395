"""MCTF (Lee, Choi and Kim, CVPR 2024, "Multi-criteria Token Fusion with One-step-ahead Attention
for Efficient Vision Transformers", arXiv 2403.10030): fuse tokens by similarity, informativeness
and size at once, in both directions of a bipartite matching, with attention-weighted pooling.

Written from the paper and its reference code (github.com/mlvlab/MCTF: ``utils/mctf.py``
``mctf`` / ``bipartite_soft_matching`` / ``merge_wavg``, ``models/modules/blocks.py``
``Block_DEIT``, ``models/SA/MHSA.py``, ``models/deit.py``, and the DeiT-T/DeiT-S evaluation
scripts ``run/eval_deit_{t,s}_mctf.sh``: ``--mctf_type [16,0,0,1,1,1,20,40,1,1,0] --r_evals [16]
--activate_layer [1..11]``).

In every block from the second on (the reference's ``activate_layer`` 1..11), with the block's
attention probabilities ``A`` (B, H, N, N) and the tokens ``x`` (B, N, C), all N tokens
alternate into sets A (even positions) and B (odd positions), as in ToMe:

1. criteria, each raised to ``1/τ`` (a τ of 0 turns that criterion off):

   - similarity ``W_sim(i, j) = ((cos(x_i, x_j) + 1) / 2)^(1/τ_sim)`` on the tokens themselves
     (not the keys);
   - informativeness ``W_info(i, j) = (ι_i ι_j)^(1/τ_info)``, where ``ι = (1/ā) / max(1/ā)``
     and ``ā_j = mean_{h,i} A[h, i, j]`` is the attention token ``j`` receives (over heads and
     every query); rarely attended (uninformative) tokens score high and fuse first;
   - size ``W_size(i, j) = (σ_i σ_j)^(1/τ_size)`` with ``σ = (1/s) / max(1/s)``: big fused
     tokens score low, so no token swallows everything;

   the score of an edge ``A_i → B_j`` is ``W_sim · W_info · W_size``; prefix tokens never fuse;
2. bidirectional bipartite matching, ``r`` fusions in all: each A token picks its best B token
   and the ``⌊r/2⌋`` best-scoring A tokens fuse into their picks; then each B token (carrying
   what it just received) picks its best A token among the A tokens left, on the same scores,
   and the ``⌈r/2⌉`` best-scoring B tokens fuse into their picks;
3. attention-weighted pooling: a fused token is ``Σ w_i x_i / Σ w_i`` over its members with
   ``w_i = ā_i · s_i`` (the attention the member receives times its size); sizes add up;
4. ``r`` is capped at ``(N − prefix) // 2`` and so that at least 10 tokens remain
   (``N − r ≥ 10``), as in the reference.

Proportional attention is on, as in the reference's DeiT evaluation (``mctf_type[3] = 1``: the
block's attention, the one ``ā`` is read from included, gets ``+ log s`` on its logits);
``prop_attn=False`` is the variant without it. Defaults are the reference's DeiT-T/DeiT-S
evaluation: ``r = 16`` in blocks 1..11, ``τ_sim = 1``, ``τ_info = 20``, ``τ_size = 40``,
bidirectional, attention pooling (``mctf_type[9] = 1``).

One-step-ahead attention and where this runs. The reference fuses at the *start* of a block:
it computes that block's attention on the unfused tokens, reads informativeness from it (the
"one-step-ahead" attention: the map of the block about to run, not the previous block's), fuses
the block input, pools the attention map with the same weights (query rows attention-weighted,
key columns summed) and applies the pooled map to the fused tokens' values; the MLP then sees the
fused tokens. Here the reducer runs between the attention residual and the MLP and is given that
same attention map (the block's own, on the unfused tokens), so informativeness is read from
exactly the map the reference uses, and the MLP and every later block see the same token counts
as in the reference.

Deviations from the reference, each deliberate:

- fusion happens after the block's attention residual instead of before the block: the fused
  token is the pooled ``x_i + Attn(x)_i`` of its members, where the reference pools the block
  input and adds ``proj(Ā · V(LN(x̄)))`` with the pooled map ``Ā`` (column sums) applied to the
  fused tokens' values; this block's attention therefore runs over all ``N`` tokens (``A·V`` and
  the projection included, the reference does those at ``N − r``);
- the similarity metric is the tokens after the attention residual, not the block input (which
  the harness no longer holds when the reducer runs);
- every prefix token (class, distillation, registers) is protected on both sides of the matching;
  the reference masks only the first ``num_protected`` A rows, which with a distillation token
  would protect the third token and leave the distillation token (a B token) fusible;
- output order: prefix tokens first, then the remaining A tokens, then the remaining B tokens,
  each in token order (the reference puts the remaining B tokens, and without a prefix token the
  A tokens too, in score order); attention is permutation-equivariant, so no prediction changes;
- ties in the edge ordering are broken by token order (stable sort);
- tokens left alone are copied bit for bit (the reference recomputes them as ``(w x) / w``);
- ``r`` may be fractional: it is spread over the reducing blocks by cumulative rounding so the
  average is exact (ToMe's convention here), which lets budget matching hit a MACs target; an
  integer ``r`` is the reference's constant schedule. The reference's fractional ``r < 1``
  (a fraction of the tokens) is not offered;
- the reducing blocks are ``first_block..depth-1`` (the reference's list of active layers, 1..11
  on DeiT, is contiguous from 1 in every script it ships); the training-time teacher/student
  branches and token-reduction-consistency loss are not part of a training-free benchmark.

``token_counts`` is static: every image fuses exactly ``r`` tokens per block (after the caps).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from methods.base import ATTN, ModelInfo, ReducerConfigError, TokenReducer, TokenState
from methods.tokens import batch_gather, group_counts, merge_every_token, shape_constant, token_range, unit_rows
from methods.tome import mask_prefix_edges

MIN_TOKENS = 10
"""The reference never fuses below 10 tokens in all (``if t - r < 10: r = t - 10``)."""

POOLINGS = ("attention", "size")


def fused_count(num_tokens: int, num_prefix: int, r: int) -> int:
    """Tokens actually fused away from ``num_tokens``: ``r`` capped at half the non-prefix
    tokens and so that at least :data:`MIN_TOKENS` remain (the reference's two caps)."""
    n = int(num_tokens)
    return max(0, min(int(r), n - MIN_TOKENS, (n - int(num_prefix)) // 2))


def mctf_schedule(r: float, num_blocks: int) -> list[int]:
    """Per-block fusions over ``num_blocks`` reducing blocks: a constant integer ``r``, or a
    fractional one spread by cumulative rounding so the average is exactly ``r``."""
    return [round((i + 1) * r) - round(i * r) for i in range(num_blocks)]


def received_attention(attn: Tensor) -> Tensor:
    """``ā_j``: the attention each token receives, averaged over heads and queries, ``(B, N)``."""
    return attn.mean(dim=(1, 2))


def normalised_inverse(values: Tensor) -> Tensor:
    """``(1/v) / max(1/v)`` per image, ``(B, N)``: 1 for the smallest value, smaller above."""
    inv = values.reciprocal()
    return inv / inv.amax(dim=-1, keepdim=True)


def _power(values: Tensor, tau: float, clamp: bool = False) -> Tensor | None:
    """``values^(1/τ)``, or None when ``τ`` is 0 (the criterion is off). ``τ = 1`` (the
    similarity's default) skips the power: ``pow(v, 1.0)`` is a copy of ``v``, and at batch 1
    each operator costs its dispatch. ``clamp``: negative values become 0 first, for the
    similarity's ``(cos + 1) / 2``, which rounding can take below 0; the per-token criteria
    (:func:`normalised_inverse` of non-negative values) are never negative and skip it."""
    if tau == 0:
        return None
    if clamp:
        values = values.clamp_min(0)
    return values if tau == 1 else values.pow(1.0 / tau)


def mctf_scores(
    metric: Tensor,
    attn: Tensor | None,
    size: Tensor,
    num_prefix: int,
    tau_sim: float,
    tau_info: float,
    tau_size: float,
    received: Tensor | None = None,
) -> Tensor:
    """Multi-criteria scores ``(B, ⌈N/2⌉, ⌊N/2⌋)`` of the edges from set A (even positions) to
    set B (odd positions): ``W_sim · W_info · W_size``; edges touching a prefix token are −inf.

    ``metric`` (B, N, C) gives the cosine similarities, ``attn`` (B, H, N, N) the
    informativeness (None or ``tau_info = 0``: off), ``size`` (B, N) the size criterion.
    Each pairwise product ``(u_i u_j)^(1/τ)`` is computed as ``u_i^(1/τ) · u_j^(1/τ)``.
    ``received``: :func:`received_attention` of ``attn`` when the caller has it already (it
    reads the whole attention map, and the pooling needs it too).
    """
    unit = unit_rows(metric.float())
    a, b = unit[:, ::2], unit[:, 1::2]
    cos = a @ b.transpose(-1, -2)
    sim = _power((cos + 1) / 2, tau_sim, clamp=True)
    scores = torch.ones_like(cos) if sim is None else sim
    per_token = []
    if attn is not None and tau_info != 0:
        received = received_attention(attn) if received is None else received
        per_token.append(_power(normalised_inverse(received), tau_info))
    per_token.append(_power(normalised_inverse(size.float()), tau_size))
    for weight in per_token:
        if weight is not None:
            scores = scores * weight[:, ::2, None] * weight[:, 1::2][:, None, :]
    return mask_prefix_edges(scores, num_prefix)


def remaining_slots(num_prefix: int, n_ra: int, n_rb: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Output slots of the A and B tokens left after the matching, in token order
    (``(n_ra,)``, ``(n_rb,)``): prefix tokens first (A ones at even slots, B ones at odd), then
    the remaining A tokens, then the remaining B tokens. They depend on the counts alone, so
    eager forwards take them from a cache instead of building them in every block (a dozen
    small operators at batch 1, :func:`methods.tokens.shape_constant`)."""
    return _remaining_slots(int(num_prefix), int(n_ra), int(n_rb), device)


@shape_constant()
def _remaining_slots(num_prefix: int, n_ra: int, n_rb: int, device: torch.device) -> tuple[Tensor, Tensor]:
    p = num_prefix
    pa, pb = (p + 1) // 2, p // 2  # prefix tokens in A (even positions) and in B (odd)
    k = torch.arange(n_ra, device=device)
    slot_a = torch.where(k < pa, 2 * k, p + k - pa)
    k = torch.arange(n_rb, device=device)
    slot_b = torch.where(k < pb, 2 * k + 1, p + (n_ra - pa) + k - pb)
    return slot_a, slot_b


def bidirectional_groups(scores: Tensor, r: int, num_prefix: int, bidirectional: bool = True) -> tuple[Tensor, int]:
    """Output slot of every token after MCTF's matching; ``(group (B, N), num_out)``.

    ``scores`` (B, ⌈N/2⌉, ⌊N/2⌋) are A→B edge scores (prefix edges −inf). Step 1: the ``r1``
    A tokens with the best edges fuse into their best B token. Step 2 (bidirectional): every B
    token picks its best remaining A token on the same scores and the ``r2`` best fuse into it,
    taking along what they received in step 1. ``r1, r2 = ⌊r/2⌋, ⌈r/2⌉`` (one-way: ``r, 0``).
    Slots: prefix tokens ``0..P-1`` in token order, then the remaining A tokens, then the
    remaining B tokens, each in token order. Needs ``r ≤ (N − P) // 2``.
    """
    bsz, na, nb = scores.shape
    n, p = na + nb, int(num_prefix)
    r1, r2 = (r // 2, r - r // 2) if bidirectional else (r, 0)
    dev = scores.device
    node_max, node_idx = scores.max(dim=-1)
    edge = node_max.argsort(dim=-1, descending=True, stable=True)
    src_a = edge[:, :r1]
    rest_a = edge[:, r1:].sort(dim=-1).values  # A positions left, prefix ones first
    dst_b = node_idx.gather(1, src_a)
    n_ra = na - r1
    if r2 > 0:
        back = batch_gather(scores, rest_a).transpose(1, 2)  # (B, nb, n_ra)
        node_max2, node_idx2 = back.max(dim=-1)
        edge2 = node_max2.argsort(dim=-1, descending=True, stable=True)
        src_b = edge2[:, :r2]
        rest_b = edge2[:, r2:].sort(dim=-1).values
        dst_a = node_idx2.gather(1, src_b)  # index into rest_a
    else:
        rest_b = token_range(0, nb, dev).expand(bsz, -1)
    n_rb = nb - r2
    slot_a, slot_b = remaining_slots(p, n_ra, n_rb, dev)
    group = torch.empty(bsz, n, dtype=torch.long, device=dev)
    group_a, group_b = group[:, 0::2], group[:, 1::2]  # views: the scatters below fill ``group``
    group_b.scatter_(1, rest_b, slot_b.expand(bsz, -1))
    if r2 > 0:
        group_b.scatter_(1, src_b, slot_a[dst_a])
    group_a.scatter_(1, rest_a, slot_a.expand(bsz, -1))
    group_a.scatter_(1, src_a, group_b.gather(1, dst_b))
    return group, n - r1 - r2


def pool_groups(state: TokenState, group: Tensor, num_out: int, weight: Tensor) -> TokenState:
    """Fuse the tokens of each group into ``Σ w x / Σ w``; sizes and source maps add up.
    A token alone in its group (prefix tokens included) is copied exactly and keeps its ``pos``.

    Exactly: a lone token's weight is set to 1 before the merge, and ``(1·x) / 1`` is ``x``
    in every bit, so the lone tokens need no gather and no blend over every channel after the
    merge (at batch 1 each operator costs its dispatch; this saves seven per block)."""
    single = group_counts(group, num_out).gather(1, group) == 1  # per token: alone in its group
    x, size, source = merge_every_token(state, group, num_out, weight=torch.where(single, 1.0, weight))
    lone_pos = torch.where(single, state.pos, -1)
    pos = state.pos.new_full((group.shape[0], num_out), -1).scatter_(1, group, lone_pos)  # merged groups: all write -1
    return state.replace(x=x, size=size, pos=pos, source=source, grid=None, reduced=True)


def mctf_fuse(
    state: TokenState,
    r: int,
    tau_sim: float = 1.0,
    tau_info: float = 20.0,
    tau_size: float = 40.0,
    bidirectional: bool = True,
    pooling: str = "attention",
) -> TokenState:
    """One MCTF step on a state whose ``attn`` tap is set (``r`` before the caps)."""
    p = state.num_prefix
    r = fused_count(state.num_tokens, p, r)
    if r <= 0:
        return state
    wanted = state.attn is not None and (tau_info != 0 or pooling == "attention")
    received = received_attention(state.attn) if wanted else None
    scores = mctf_scores(state.x, state.attn, state.size, p, tau_sim, tau_info, tau_size, received)
    group, num_out = bidirectional_groups(scores, r, p, bidirectional)
    weight = state.size.float()
    if pooling == "attention":
        weight = weight * received
    return pool_groups(state, group, num_out, weight)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class MCTF(TokenReducer):
    """MCTF: fuse ``r`` tokens per block by similarity × informativeness × size, matched in both
    directions, pooled by the attention each token receives.

    Args:
        r: tokens fused in every reducing block (the budget knob; the reference's 16); a
            fraction is spread over the reducing blocks so the average is exact. Capped per
            block at half the non-prefix tokens and at leaving 10 tokens (see :meth:`notes`).
        first_block: the first reducing block; every later block reduces too (the reference's
            active layers 1..11 on a 12-block DeiT: 1).
        tau_sim: temperature of the similarity criterion (reference 1); 0 turns it off.
        tau_info: temperature of the informativeness criterion (reference 20); 0 turns it off.
        tau_size: temperature of the size criterion (reference 40); 0 turns it off.
        bidirectional: match A→B then B→A, ``⌊r/2⌋`` and ``⌈r/2⌉`` fusions (reference: true);
            false fuses all ``r`` A tokens into B tokens, as ToMe does.
        pooling: ``"attention"`` (reference): a fused token is the mean of its members weighted
            by received attention × size; ``"size"``: weighted by size only (ToMe's average).
        prop_attn: proportional attention (``log(size)`` on the logits); on in the reference.
    """

    budget_knob = "r"
    budget_range = (0.0, 50.0)

    def __init__(
        self,
        r: float = 16,
        first_block: int = 1,
        tau_sim: float = 1.0,
        tau_info: float = 20.0,
        tau_size: float = 40.0,
        bidirectional: bool = True,
        pooling: str = "attention",
        prop_attn: bool = True,
    ) -> None:
        if not _is_number(r) or not 0 <= r < math.inf:
            raise ReducerConfigError(f"MCTF r (tokens fused per block) must be a number >= 0, got {r!r}")
        if not isinstance(first_block, int) or isinstance(first_block, bool) or first_block < 0:
            raise ReducerConfigError(f"MCTF first_block must be a non-negative integer, got {first_block!r}")
        for name, tau in (("tau_sim", tau_sim), ("tau_info", tau_info), ("tau_size", tau_size)):
            if not _is_number(tau) or not 0 <= tau < math.inf:
                raise ReducerConfigError(f"MCTF {name} must be a finite number >= 0 (0: criterion off), got {tau!r}")
        if not isinstance(bidirectional, bool):
            raise ReducerConfigError(f"MCTF bidirectional must be true or false, got {bidirectional!r}")
        if pooling not in POOLINGS:
            raise ReducerConfigError(f"MCTF pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if not isinstance(prop_attn, bool):
            raise ReducerConfigError(f"MCTF prop_attn must be true or false, got {prop_attn!r}")
        super().__init__(
            r=r,
            first_block=first_block,
            tau_sim=tau_sim,
            tau_info=tau_info,
            tau_size=tau_size,
            bidirectional=bidirectional,
            pooling=pooling,
            prop_attn=prop_attn,
        )
        self.taus = (float(tau_sim), float(tau_info), float(tau_size))
        self.schedule: list[int] = []

    def _schedule(self, depth: int) -> list[int]:
        first = self.hparams["first_block"]
        return [0] * min(first, depth) + mctf_schedule(self.hparams["r"], max(0, depth - first))

    def bind(self, info: ModelInfo) -> None:
        first = self.hparams["first_block"]
        if first >= info.depth:
            raise ReducerConfigError(
                f"MCTF first_block={first} is outside the model's {info.depth} blocks (valid: 0..{info.depth - 1})"
            )
        super().bind(info)
        self.schedule = self._schedule(info.depth)

    def notes(self) -> list[str]:
        """Blocks where ``r`` exceeds what the caps allow (half the non-prefix tokens, at least
        10 tokens left): fewer tokens are fused there, as in the reference; say so."""
        if self.info is None:
            return []
        p, n = self.info.num_prefix, self.info.num_prefix + self.info.num_patches
        capped = []
        for block, r in enumerate(self.schedule):
            can = fused_count(n, p, r)
            if r > can:
                capped.append((block, r, can))
            n -= can
        if not capped:
            return []
        b, r, can = capped[0]
        return [
            f"r capped in {len(capped)} of {len(self.schedule)} blocks (first: block {b} fuses {can} of the {r} "
            f"asked; a block fuses at most half its non-prefix tokens and leaves at least {MIN_TOKENS})"
        ]

    def reduces_at(self, block: int) -> bool:
        return block < len(self.schedule) and self.schedule[block] > 0

    def needs(self, block: int) -> frozenset[str]:
        return frozenset({ATTN})

    def reduce(self, state: TokenState, block: int) -> TokenState:
        return mctf_fuse(
            state,
            self.schedule[block],
            *self.taus,
            bidirectional=self.hparams["bidirectional"],
            pooling=self.hparams["pooling"],
        )

    def token_counts(self, num_prefix: int, num_patches: int, depth: int) -> list[tuple[int, int]]:
        n = num_prefix + num_patches
        counts = []
        for r in self._schedule(depth):
            out = n - fused_count(n, num_prefix, r)
            counts.append((n, out))
            n = out
        return counts

    def overhead_macs(self, block: int, n_tokens: int, dim: int, heads: int) -> int:
        """Cosine similarities of set A against set B on the full-width tokens:
        ``⌈N/2⌉·⌊N/2⌋·C`` (the criteria and pooling are elementwise)."""
        prefix = self.info.num_prefix if self.info else 1
        if block >= len(self.schedule) or fused_count(n_tokens, prefix, self.schedule[block]) <= 0:
            return 0
        return math.ceil(n_tokens / 2) * (n_tokens // 2) * dim
