"""ATS (Fayyaz, Abbasi Koohpayegani, Rezaei Jafari, Sengupta, Vaezi Joze, Sommerlade,
Pirsiavash, Gall, "Adaptive Token Sampling For Efficient Vision Transformers", ECCV 2022,
arXiv 2111.15667): sample the tokens to keep by inverse-transform sampling of their significance.

Written from the paper and its reference code (github.com/adaptivetokensampling/ATS,
``libs/models/transformers/ats_block.py``: ``AdaptiveTokenSampler.score_assignment_step``,
``create_ys``, ``inverse_transform_sampling``, ``get_unique_indices``, ``ATSBlock``; and
``libs/models/transformers/vit.py`` with ``configs/ImageNet/DeiT_S.yaml`` for where the ATS blocks
sit and their token budget: ``ATS_BLOCKS [3..11]``, ``NUM_TOKENS 197``, ``DROP_TOKENS``), not copied.

In each ATS block (3 to 11 by default), between the attention residual and the MLP, with ``P``
prefix tokens and ``T`` other slots entering (some may be empty, left by an earlier ATS block):

1. significance ``s_j = (Σ_h A_h[cls, j]) · ‖v_j‖`` of every non-prefix token ``j``: the class
   token's attention summed over the heads times the L2 norm of the token's value vector with
   all heads concatenated (the block's own ``v``, before the output projection), normalised to
   ``Σ_j s_j = 1`` over the ``T`` tokens (an empty slot gets no attention, so ``s = 0``);
2. the scores sorted ascending and their CDF ``c = cumsum(s)`` rescaled to
   ``ĉ = (c − min c) / (max c − min c)`` (so the lowest token sits at ``ĉ = 0``);
3. ``K`` evenly spaced points ``y_i = y₀ + i·(1 − y₀)/(K − 1)`` from ``y₀``, the smallest
   positive ``ĉ``, to 1; each picks the token whose ``ĉ`` is nearest to it (``argmin |y_i − ĉ_j|``,
   the first on ties): high-significance tokens cover long stretches of the CDF and are picked
   several times, low ones fall between the points and are dropped;
4. duplicates are removed, so each image keeps its own number (``≤ K``) of distinct tokens.

The block continues with the kept tokens only. The reference samples rows of the attention
output and adds them to the same rows of the residual stream; that is exactly gathering the
kept tokens after the attention residual, which is what happens here: kept tokens keep their
values bit for bit. Prefix tokens (class, distillation, registers) stay first and untouched.

Static shapes (sync-free, one compiled graph): each ATS block returns ``min(K, T)`` patch slots.
The sampled indices are sorted, a duplicate is found by comparing neighbours and turned into an
empty slot (size 0, zero vector, ``pos`` −1), and a second sort moves the empty slots last: the
kept tokens come first in ascending-significance order, as in the reference. The state is
returned with ``may_have_empty=True`` and every later block masks the empty slots out of
attention (the reference's ``policy``); pooling ignores them. Since tokens are only dropped,
sizes stay 1 (0 when empty): proportional attention (``prop_attn``, off as in the reference)
gives exactly the same numbers as the empty-slot mask.

Cost: :meth:`ATS.token_counts` gives the ``P + min(K, T)`` static slots, which is what is
computed here and what the analytic MACs, budget matching and the tests count. The paper
reports the GFLOPs of its adaptive count (the filled slots, averaged over the validation set),
which is lower: the MACs of this implementation over-count what ATS's adaptive count would
cost. :func:`filled_counts` measures the mean number of filled slots after every block on a
batch, to compare.

The budget knob ``keep_rate`` is the reference's per-stage token budget ``K`` as a fraction of
the model's patch count: every ATS block samples ``K = max(8, ceil(keep_rate · patches))``
points (capped at the patch count) into ``min(K, T)`` slots. ``keep_rate = 1`` is the
reference's DeiT-S configuration (``NUM_TOKENS 197`` on 196 patches: 196 samples in every stage,
and the reduction comes only from duplicates); ``0.5`` is ``K = 98`` of 196 (``NUM_TOKENS 99``).

Deviations from the reference, each deliberate:

- static slots instead of dropping: the reference (``DROP_TOKENS``) pads each batch to its
  largest kept count; here every image has ``min(K, T)`` slots and the empty ones are masked.
  Accuracy is the same; MACs count the static slots (see above);
- default ``keep_rate`` 0.5, not the reference's 1.0 (all tokens): with static slots
  ``keep_rate = 1`` saves nothing in MACs, so the default is the budget whose static slots cost
  what the paper reports for this configuration (DeiT-S 4.6 → 2.9 GFLOPs: the MACs ratio 0.63
  that ``keep_rate = 0.5`` gives on DeiT-S, 0.63 also on DeiT-Tiny). Budget matching sets it;
- the budget is a fraction of the patch count (``ceil``), applied to patch slots only; the
  reference's ``NUM_TOKENS`` counts the class token (``round(n)``, its own floor of 8 counting
  the class token), and only ``NUM_TOKENS`` equal to the tokens entering runs in its code (its
  sample count is fixed at the input token count and a smaller budget fails on a shape);
- every sampled point may pick any of the ``T`` tokens, as the paper describes; the
  reference's CDF padding, with fewer points than tokens, would crop the lowest-scoring tokens
  out of the candidates (a path its released configuration never takes);
- every prefix token is kept and left out of the scores (the reference has one class token);
- models without a class token (average-pooled ViTs, which the reference does not support):
  the attention each token receives averaged over the filled queries replaces the class
  token's row (needs the full attention map), as :mod:`methods.diffrate` and :mod:`methods.ppt`;
- the reference's duplicate check pads with the value 1, so a sample list whose largest index
  is 1 would lose that token too; here only true duplicates are removed;
- scores and the CDF are computed in float32 whatever the model's dtype; sorting is stable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from methods.base import ATTN, CLS_ATTN, VALUES, KeepRateReducer, ReducerConfigError, TokenState
from methods.patch import reduction_context
from methods.tokens import batch_gather, class_or_received_attention, prefix_index

MIN_SAMPLES = 8
"""The reference's floor on the tokens an ATS block samples ("can't be less than 8")."""

# -- the equations ------------------------------------------------------------------------------------


def significance_scores(attn_row: Tensor, values: Tensor, num_prefix: int, filled: Tensor | None = None) -> Tensor:
    """ATS's normalised significance ``(B, T)`` of the non-prefix tokens.

    ``attn_row`` is ``(B, H, N)``, per head the attention the class token pays to each token;
    ``values`` is ``(B, H, N, d)``. ``s_j = Σ_h attn_row[h, j] · ‖v_j‖`` with ``‖v_j‖`` the norm of
    all heads' values concatenated, then ``s / Σ s`` over the ``T = N − P`` tokens. ``filled``
    ``(B, N)`` zeroes the score of empty slots (their attention is already 0).
    """
    v_norm = values.float().square().sum(dim=(1, 3)).sqrt()  # (B, N)
    score = attn_row.float().sum(dim=1) * v_norm
    if filled is not None:
        score = score * filled.to(score.dtype)
    score = score[:, num_prefix:]
    return score / score.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(score.dtype).tiny)


def rescaled_cdf(sorted_scores: Tensor) -> Tensor:
    """``ĉ = (c − min c) / (max c − min c)`` of ``c = cumsum(scores)`` (scores sorted ascending)."""
    cdf = sorted_scores.cumsum(dim=-1)
    lo = cdf.amin(dim=-1, keepdim=True)
    hi = cdf.amax(dim=-1, keepdim=True)
    return (cdf - lo) / (hi - lo).clamp_min(torch.finfo(cdf.dtype).tiny)


def sample_points(cdf: Tensor, k: int) -> Tensor:
    """The ``k`` points ``(B, k)`` evenly spaced from ``y₀`` (the smallest positive ``ĉ``) to 1."""
    positive = torch.where(cdf > 0, cdf, torch.full_like(cdf, 1e8))  # the reference's "+ 1e8 where 0"
    start = positive.amin(dim=-1, keepdim=True)
    steps = torch.arange(k, device=cdf.device, dtype=cdf.dtype)
    return start + steps * (1 - start) / max(k - 1, 1)


def inverse_transform_sample(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``k`` samples by inverse-transform sampling of ``scores`` ``(B, T)``.

    Returns ``(picked, order)``: ``picked`` ``(B, k)`` are positions in ``order`` (``(B, T)``,
    the tokens sorted by ascending score), duplicates included; each sample picks the token
    whose rescaled CDF value is nearest to its point (the first such position on ties)."""
    sorted_scores, order = scores.sort(dim=-1, stable=True)
    cdf = rescaled_cdf(sorted_scores)
    ys = sample_points(cdf, k)
    picked = (ys[:, :, None] - cdf[:, None, :]).abs().argmin(dim=-1)
    return picked, order


def distinct_slots(picked: Tensor, num_tokens: int, slots: int) -> Tensor:
    """Sorted distinct values of ``picked`` ``(B, k)`` in the first ``slots`` columns, each
    repeat replaced by ``num_tokens`` (an empty slot) and moved after them: no data-dependent
    shape. ``picked`` holds fewer than ``num_tokens + 1`` distinct values."""
    ordered = picked.sort(dim=-1).values
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    ordered = torch.where(repeat, torch.full_like(ordered, num_tokens), ordered)
    ordered = ordered.sort(dim=-1).values
    if ordered.shape[1] < slots:
        pad = torch.full_like(ordered[:, :1], num_tokens).expand(-1, slots - ordered.shape[1])
        ordered = torch.cat([ordered, pad], dim=1)
    return ordered[:, :slots]


def ats_select(scores: Tensor, k: int, slots: int) -> Tensor:
    """The tokens one ATS step keeps: ``(B, slots)`` indices among the ``T`` scored tokens in
    ascending-score order, ``-1`` for an empty slot (after the kept ones)."""
    t = scores.shape[1]
    picked, order = inverse_transform_sample(scores, k)
    where = distinct_slots(picked, t, slots)
    kept = order.gather(1, where.clamp_max(t - 1))
    return torch.where(where < t, kept, torch.full_like(kept, -1))


def keep_or_empty(state: TokenState, chosen: Tensor) -> TokenState:
    """The prefix, then the non-prefix tokens at ``chosen`` ``(B, S)`` (indices among them, −1
    for an empty slot: size 0, zero vector, ``pos`` −1, no source), copied exactly."""
    p = state.num_prefix
    filled = chosen >= 0
    idx = torch.cat([prefix_index(state), chosen.clamp_min(0) + p], dim=1)
    keep = torch.cat([torch.ones_like(idx[:, :p], dtype=torch.bool), filled], dim=1)
    x = batch_gather(state.x, idx)
    source = None
    if state.source is not None:
        src = batch_gather(state.source, idx)
        source = torch.where(keep[..., None], src, torch.zeros_like(src))
    size = batch_gather(state.size, idx)
    pos = batch_gather(state.pos, idx)
    return state.replace(
        x=torch.where(keep[..., None], x, torch.zeros_like(x)),
        size=torch.where(keep, size, torch.zeros_like(size)),
        pos=torch.where(keep, pos, torch.full_like(pos, -1)),
        source=source,
        grid=None,
        reduced=True,
        may_have_empty=True,
    )


def ats_step(state: TokenState, k: int) -> TokenState:
    """One ATS step on a state with its ``cls_attn`` (or ``attn``) and ``values`` taps: ``k``
    samples into ``min(k, T)`` patch slots."""
    t = int(state.num_tokens) - state.num_prefix
    scores = significance_scores(
        class_or_received_attention(state, state.size > 0), state.values, state.num_prefix, state.size > 0
    )
    return keep_or_empty(state, ats_select(scores, k, min(k, t)))


def num_samples(keep_rate: float, num_patches: int) -> int:
    """``K``: ``ceil(keep_rate · patches)``, at least the reference's 8, at most the patches."""
    n = int(num_patches)
    return min(n, max(MIN_SAMPLES, math.ceil(keep_rate * n - 1e-9)))


# -- the reducer --------------------------------------------------------------------------------------


class ATS(KeepRateReducer):
    """Adaptive token sampling: in every ATS block, keep the distinct tokens that ``K`` evenly
    spaced points on the significance CDF pick (a per-image count in ``min(K, T)`` static slots).

    Args:
        blocks: indices of the ATS blocks (0-based, strictly increasing); the reference's DeiT
            places one in every block from 3 to 11.
        keep_rate: the token budget ``K`` of each ATS block as a fraction of the model's patch
            count, ``K = max(8, ceil(keep_rate · patches))`` samples and at most ``K`` slots; one
            number for every ATS block or one per block (the reference's per-stage
            ``NUM_TOKENS``). In (0, 1]; the budget knob. 1 is the reference's DeiT-S setting
            (all tokens sampled: only duplicates are dropped, and static slots save nothing).
        prop_attn: proportional attention (``log(size)``) once tokens were dropped; off, as in
            the reference. Sizes stay 0 or 1, so on or off gives the same numbers.
    """

    budget_range = (0.02, 1.0)

    def __init__(
        self,
        blocks: Sequence[int] = (3, 4, 5, 6, 7, 8, 9, 10, 11),
        keep_rate: float | Sequence[float] = 0.5,
        prop_attn: bool = False,
    ) -> None:
        if not isinstance(prop_attn, bool):
            raise ReducerConfigError(f"ATS prop_attn must be true or false, got {prop_attn!r}")
        if isinstance(keep_rate, (bool, str)) or not isinstance(keep_rate, (int, float, Sequence)):
            raise ReducerConfigError(f"ATS keep_rate must be a number in (0, 1] or a list of them, got {keep_rate!r}")
        super().__init__(blocks=blocks, keep_rate=keep_rate, prop_attn=prop_attn)

    def needs(self, block: int) -> frozenset[str]:
        if self.info is not None and self.info.num_prefix == 0:
            return frozenset({ATTN, VALUES})
        return frozenset({CLS_ATTN, VALUES})

    def num_samples(self, block: int, num_patches: int) -> int:
        """``K`` of this ATS block on a model with ``num_patches`` patches."""
        return num_samples(self.keep[block], num_patches)

    def reduce(self, state: TokenState, block: int) -> TokenState:
        patches = state.patch_grid[0] * state.patch_grid[1]
        return ats_step(state, self.num_samples(block, patches))

    def token_counts(self, num_prefix: int, num_patches: int, depth: int) -> list[tuple[int, int]]:
        slots, counts = num_patches, []
        for b in range(depth):
            n_in = num_prefix + slots
            if self.reduces_at(b):
                slots = min(slots, self.num_samples(b, num_patches))
            counts.append((n_in, num_prefix + slots))
        return counts

    def overhead_macs(self, block: int, n_tokens: int, dim: int, heads: int) -> int:
        """The class-token attention row ``q_cls · K`` (none without a class token: the full
        attention map is the block's own). ``‖v‖``, the CDF and the sampling are not matmuls."""
        if not self.reduces_at(block) or (self.info is not None and self.info.num_prefix == 0):
            return 0
        return n_tokens * dim

    def notes(self) -> list[str]:
        if self.info is None:
            return []
        patches = self.info.num_patches
        floored = [b for b in self.blocks if math.ceil(self.keep[b] * patches - 1e-9) < min(MIN_SAMPLES, patches)]
        if not floored:
            return []
        return [
            f"K raised to the reference's floor of {min(MIN_SAMPLES, patches)} samples in {len(floored)} of "
            f"{len(self.blocks)} ATS blocks (keep_rate {self.keep[floored[0]]:g} of {patches} patches asks fewer)"
        ]


def filled_counts(model: nn.Module, images: Tensor) -> list[float]:
    """Mean number of filled tokens (size > 0, prefix included) leaving each block of the
    patched ``model`` on ``images``: ATS's adaptive token count, the counterpart of
    ``reduction_context(model).token_trace`` (the static slots, which the MACs count).
    Reads the counts back to the host after the forward (an analysis tool, not the forward)."""
    ctx = reduction_context(model)
    seen: dict[int, Tensor] = {}
    handle = ctx.observe(lambda block, before, after: seen.__setitem__(block, (after.size > 0).sum(dim=1)))
    try:
        with torch.no_grad():
            model(images)
    finally:
        handle.remove()
    state = ctx.state
    assert state is not None
    current = float(ctx.info.num_prefix + state.patch_grid[0] * state.patch_grid[1])
    out = []
    for block in range(len(ctx.token_trace)):
        if block in seen:
            current = seen[block].float().mean().item()
        out.append(current)
    return out
