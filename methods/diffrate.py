"""DiffRate (Chen et al., ICCV 2023, arXiv 2305.17997): prune and merge tokens in every block
by a per-block schedule that a differentiable search finds.

Reference code: github.com/OpenGVLab/DiffRate (``DiffRate/patch/deit.py``, ``DiffRate/merge.py``,
``DiffRate/ddp.py``; the published schedules are its ``compression_rate.json``). Written from
the paper and that code, not copied.

What one block does, between the attention residual and the MLP (:func:`diffrate_step`):

1. rank the non-prefix tokens by the attention the class token pays them (heads averaged);
2. prune: keep the ``prune_kept[l]`` highest-ranked ones, drop the rest;
3. merge: every kept token ranked after the first ``merge_kept[l]`` joins the most similar of
   those (cosine of the hidden states ``x``, as the reference's ``get_merge_func``); a merged
   token is the plain mean of its members (the reference's ``scatter_reduce(mean)``, not
   size-weighted).

Proportional attention, as the reference: every block adds ``log(s)`` to the attention logits,
where a merged token's ``s`` is its destination's plus each source's ``s`` times that source's
cosine similarity to it (the reference's "size considering similarity"). :attr:`TokenState.size`
keeps the plain patch counts (what the harness checks); ``s`` travels in ``state.extra``.
``prop_attn="size"`` uses the patch counts instead (ToMe's), ``"none"`` nothing.

The schedule (:func:`schedule_counts`) is given in the reference's form: token counts after
pruning and after merging per block, class token included (``197`` = nothing removed on a
224-pixel /16 ViT). The search (``search_target``, :class:`DiffRate` docstring) learns it from
two rate distributions per block with the ViT frozen, as the reference's ``DiffRate`` module
(``ddp.py``): candidates ``n, n-g, ...`` kept tokens, a softmax over them, the kept count
``ceil(E[candidate])`` with a straight-through gradient, masks on the attention of later
blocks with a straight-through gradient to the probability that each rank is kept, and the
penalty ``λ·(GMACs - target)²`` (:meth:`DiffRate.extra_loss`). At evaluation the trained
distributions give the schedule ``ceil(E[candidate])``, as the reference's.

Deviations from the reference, and why:

- Prefix tokens: the reference has exactly one class token; here every prefix token (class,
  distillation, registers) is kept first and never merged, and the schedule's counts include
  one prefix token, so ``prune_kept - 1`` is the number of patch tokens kept whatever the prefix.
- No class token (average-pooled ViTs, which the reference does not support): tokens are
  ranked by the attention they receive averaged over heads and all queries (needs the full
  attention map). With a class token the ranking is the reference's.
- Other patch counts and depths: the schedule is written for ``ref_patches`` patches and
  ``len(prune_kept)`` blocks; elsewhere each block keeps the same *fraction* of the patches
  (depth resampled linearly), so the configs run at other resolutions and on small test ViTs.
  On DeiT-T/S/B at 224 px (196 patches, 12 blocks) the counts are the reference's exactly.
- Budget knob ``scale`` (not in the reference): each kept fraction ``f`` becomes ``f**scale``
  (``1`` = the schedule as written, ``0`` = unreduced, larger = fewer tokens), so bisection can
  place any schedule at a MACs budget; MACs fall monotonically as ``scale`` grows.
- A source whose best cosine similarity is negative adds ``0`` (not a negative amount) to its
  destination's attention size: the reference would shrink the size, possibly to ``<= 0``
  (a NaN logit); its trained DeiTs do not hit this, random test ViTs can.
- Search masks: the reference multiplies the exponentiated logits by the 0/1 mask. The harness's
  attention takes an additive bias only, so a dropped token gets ``-30`` on its logits (weight
  ``e^-30``, nothing in float32) and the bias's gradient is scaled back by ``e^30`` at dropped
  tokens, which gives the multiplicative mask's gradient (:class:`_MaskBias`). A dropped
  token also stops attending to itself (the reference lets it; its output is never read).
- Search FLOPs: ``λ·(GMACs - target)²`` counts the transformer blocks only (the reference adds
  the patch embedding and the head, constants), with the MLP at 4x the width, and the target is
  a fraction ``search_target`` of the unreduced blocks' MACs rather than absolute GFLOPs.
- The search trains through ``bench.finetune ... train=reducer``; the penalty reaches the loss
  through :meth:`DiffRate.extra_loss`, which the training loop must add (see its docstring).

Searching a schedule (the ViT frozen, only the ``2 x depth`` rate distributions trained)::

    python -m bench.finetune method=diffrate method.reducer.search_target=0.64 \
        budget.macs_ratio=null finetune=calibrate loss=ce train=reducer \
        data.train_root=../shared/data/imagenet-calib-1000

``budget.macs_ratio=null`` because the target is the search's own (a searching reducer has no
budget knob). The result (``final.pt`` evaluated right after, ``reducer.pt`` beside it) holds
the distributions; a ``DiffRate`` built with the same ``search_target`` and loaded with them
runs their schedule, and :meth:`DiffRate.schedule` gives it as ``prune_kept``/``merge_kept``
lists for a config. ``search_target`` is a fraction of the blocks' MACs: 0.64 lands at 0.65 of
DeiT-Tiny's whole count (the patch embedding and head are the rest).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from methods.base import ATTN, CLS_ATTN, ModelInfo, ReducerConfigError, TokenReducer, TokenState
from methods.tokens import batch_gather, keep_tokens, merge_groups, prefix_index, unit_rows

ATTN_SIZE = "diffrate_attn_size"
"""``state.extra`` key: the reference's size for proportional attention ``(B, N)``."""
MASK = "diffrate_mask"
"""``state.extra`` key (search only): the straight-through keep mask ``(B, N)``."""
LIVE = "diffrate_live"
"""``state.extra`` key (search only): how many patch tokens are still unmasked (an int)."""
PROP_ATTN = ("similarity", "size", "none")
MASK_LOGIT = 30.0
"""Logit penalty of a masked token during the search (its weight is ``e^-30``)."""
DEIT_TINY_PRUNE = (197, 197, 196, 186, 166, 147, 117, 103, 92, 80, 74, 3)
DEIT_TINY_MERGE = (197, 196, 190, 172, 154, 125, 107, 96, 84, 78, 70, 3)
"""The reference's published DeiT-Tiny schedule for 0.8 GFLOPs (``compression_rate.json``,
``ViT-T-DeiT`` ``0.8``): the defaults, MACs ratio 0.647 on DeiT-Tiny."""


# -- the schedule ------------------------------------------------------------------------------------


def resample(fracs: Sequence[float], depth: int) -> list[float]:
    """A per-block curve of kept fractions written for ``len(fracs)`` blocks, on ``depth``
    blocks: linear in relative depth, with 1 before the first block. Exact when the depths match."""
    n = len(fracs)
    if n == depth:
        return [float(f) for f in fracs]
    pts = [1.0, *(float(f) for f in fracs)]
    out = []
    for b in range(depth):
        t = (b + 1) * n / depth
        i = min(int(t), n - 1)
        w = t - i
        out.append(pts[i] * (1 - w) + pts[i + 1] * w)
    return out


def schedule_counts(
    prune_fracs: Sequence[float], merge_fracs: Sequence[float], num_patches: int, depth: int, scale: float = 1.0
) -> list[tuple[int, int, int]]:
    """``(live, kept, merged)`` patch tokens per block: entering it, after pruning, after merging.

    Each fraction ``f`` keeps ``round(num_patches · f**scale)`` patch tokens (at least 1), and a
    block never keeps more than entered it (the reference's ``min(N, prune, merge)``).
    """
    pf, mf = resample(prune_fracs, depth), resample(merge_fracs, depth)
    live, out = num_patches, []
    for b in range(depth):
        k = max(1, math.floor(num_patches * pf[b] ** scale + 0.5))
        m = max(1, math.floor(num_patches * mf[b] ** scale + 0.5))
        k = min(live, k)
        m = min(k, m)
        out.append((live, k, m))
        live = m
    return out


def effective_fracs(prune_fracs: Sequence[float], merge_fracs: Sequence[float], depth: int) -> list[float]:
    """Fraction of the patches alive after each block: the running minimum of both curves."""
    live, out = 1.0, []
    for p, m in zip(resample(prune_fracs, depth), resample(merge_fracs, depth), strict=True):
        live = min(live, p, m)
        out.append(live)
    return out


# -- one step ------------------------------------------------------------------------------------------


def importance(state: TokenState) -> Tensor:
    """``(B, N)``: the class token's attention (heads averaged), or with no prefix token the
    attention each token receives averaged over heads and queries."""
    if state.num_prefix > 0:
        return state.cls_attn.float().mean(dim=1)
    return state.attn.float().mean(dim=(1, 2))


def rank_tokens(score: Tensor, num_prefix: int, dead: Tensor | None = None) -> Tensor:
    """Indices ``(B, N - P)`` of the non-prefix tokens by descending score (``dead`` ones last)."""
    cand = score[:, num_prefix:]
    if dead is not None:
        cand = cand.masked_fill(dead, -math.inf)
    return cand.argsort(dim=-1, descending=True) + num_prefix


def match(x: Tensor, candidates: Tensor, merged: int) -> tuple[Tensor, Tensor]:
    """For each token at ``candidates[:, merged:]`` (the sources): its most cosine-similar token
    among ``candidates[:, :merged]`` (the destinations), as ``(similarity, position among the
    destinations)``, each (B, K - merged). The metric is detached, as the reference's.

    Only the candidates' rows are copied (one gather for both sets) and normalised, not every
    token's: pruned tokens take no part. Each row is normalised by itself, so the similarities
    are the same bits as normalising all tokens first."""
    unit = unit_rows(batch_gather(x.detach(), candidates).float())
    return (unit[:, merged:] @ unit[:, :merged].transpose(-1, -2)).max(dim=-1)


def diffrate_step(state: TokenState, kept: int, merged: int, prop_attn: str) -> TokenState:
    """Prune to ``kept`` patch tokens and merge down to ``merged`` (``merged <= kept``) on a state
    whose ``cls_attn`` (or, with no prefix token, ``attn``) tap is set."""
    p = state.num_prefix
    attn_size = state.extra.get(ATTN_SIZE, state.size)
    order = rank_tokens(importance(state), p)
    pre = prefix_index(state)
    if merged >= kept:
        idx = torch.cat([pre, order[:, :kept]], dim=1)
        out = keep_tokens(state, idx)
        return out.replace(extra={**state.extra, ATTN_SIZE: batch_gather(attn_size, idx)})
    dst, src = order[:, :merged], order[:, merged:kept]
    sim, to = match(state.x, order[:, :kept], merged)
    b = state.x.shape[0]
    group = torch.full(state.size.shape, -1, dtype=torch.long, device=state.x.device)
    group.scatter_(1, pre, torch.arange(p, device=group.device).expand(b, -1))
    group.scatter_(1, dst, (p + torch.arange(merged, device=group.device)).expand(b, -1))
    group.scatter_(1, src, p + to)
    x, size, source = merge_groups(state, group, p + merged, weight=torch.ones_like(state.size))
    keep = torch.cat([pre, dst], dim=1)
    old_size = batch_gather(state.size, keep)
    pos = batch_gather(state.pos, keep)
    pos = torch.where(size == old_size, pos, torch.full_like(pos, -1))
    factor = (
        sim.clamp_min(0).to(attn_size.dtype)
        if prop_attn == "similarity"
        else torch.ones_like(sim, dtype=attn_size.dtype)
    )
    gained = torch.zeros(b, merged, dtype=attn_size.dtype, device=attn_size.device)
    gained.scatter_add_(1, to, batch_gather(attn_size, src) * factor)
    new_attn = batch_gather(attn_size, keep) + torch.cat([gained.new_zeros(b, p), gained], dim=1)
    return state.replace(
        x=x, size=size, pos=pos, source=source, grid=None, reduced=True, extra={**state.extra, ATTN_SIZE: new_attn}
    )


# -- the search's straight-through pieces -----------------------------------------------------------


class _SteCeil(torch.autograd.Function):
    """``ceil`` forward, identity backward (the reference's ``ste_ceil``)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001
        return torch.ceil(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # noqa: ANN001
        return g


class _SteMin(torch.autograd.Function):
    """``min(n, prune, merge)`` forward; the gradient goes to ``prune`` and ``merge`` both and not
    to ``n`` (the reference's ``ste_min``)."""

    @staticmethod
    def forward(ctx, n: Tensor, a: Tensor, b: Tensor) -> Tensor:  # noqa: ANN001
        return torch.minimum(n, torch.minimum(a, b))

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[None, Tensor, Tensor]:  # noqa: ANN001
        return None, g, g


class _MaskBias(torch.autograd.Function):
    """Additive logit bias of a 0/1 keep mask: 0 where kept, ``-MASK_LOGIT`` where dropped.

    Backward gives the gradient of the reference's multiplicative mask (``exp(l)·m``): at a kept
    token ``d log m / dm = 1``; at a dropped one the attention it gets is ``e^-30`` times what
    ``m = 1`` would give it, so the bias's gradient, times ``e^30``, is ``dL/dm`` there.
    """

    @staticmethod
    def forward(ctx, mask: Tensor) -> Tensor:  # noqa: ANN001
        kept = mask > 0.5
        ctx.save_for_backward(kept)
        return torch.where(kept, torch.zeros_like(mask), torch.full_like(mask, -MASK_LOGIT))

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # noqa: ANN001
        (kept,) = ctx.saved_tensors
        return g * torch.where(kept, torch.ones_like(g), torch.full_like(g, math.exp(MASK_LOGIT)))


def keep_probability(logits: Tensor, candidates: Tensor, n: int) -> Tensor:
    """``(n,)``: the probability that the token at each rank is kept, ``P(candidate > rank)``."""
    ranks = torch.arange(n, device=logits.device, dtype=candidates.dtype)
    return logits.softmax(-1) @ (candidates[:, None] > ranks[None, :]).to(logits.dtype)


def ste_mask(logits: Tensor, candidates: Tensor, n: int, upto: int, kept: int, num_prefix: int) -> Tensor:
    """``(P + n,)``: 1, except 0 at ranks ``[kept, upto)``; gradient to the keep probabilities
    (the reference's ``get_token_mask``)."""
    prob = keep_probability(logits, candidates, n)
    hard = torch.ones_like(prob)
    hard[kept:upto] = 0
    mask = hard - prob.detach() + prob
    return torch.cat([mask.new_ones(num_prefix), mask])


def expected_kept(logits: Tensor, candidates: Tensor) -> Tensor:
    """``ceil(E[candidate])`` patch tokens, straight-through (the reference's kept number)."""
    return _SteCeil.apply(logits.softmax(-1) @ candidates)


# -- the reducer -------------------------------------------------------------------------------------


def _check_counts(name: str, counts: Any, ref_patches: int) -> list[int] | None:
    if counts is None:
        return None
    if isinstance(counts, (str, bytes)) or not isinstance(counts, Sequence) or len(counts) == 0:
        raise ReducerConfigError(f"DiffRate {name} must be a non-empty list of token counts, got {counts!r}")
    out = []
    for c in counts:
        if not isinstance(c, int) or isinstance(c, bool):
            raise ReducerConfigError(f"DiffRate {name} holds {c!r}, not an integer token count")
        if not 2 <= c <= ref_patches + 1:
            raise ReducerConfigError(
                f"DiffRate {name} counts include the class token and must lie in [2, {ref_patches + 1}] "
                f"(ref_patches={ref_patches}), got {c}"
            )
        out.append(c)
    return out


def _positive_number(name: str, value: Any, low: float = 0.0, inclusive: bool = True) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ReducerConfigError(f"DiffRate {name} must be a finite number, got {value!r}")
    if value < low or (not inclusive and value == low):
        raise ReducerConfigError(f"DiffRate {name} must be {'>=' if inclusive else '>'} {low}, got {value}")
    return float(value)


class DiffRate(TokenReducer):
    """DiffRate: per block, prune by class attention, then merge into the most similar kept
    tokens, following an explicit schedule or a searched one.

    Args:
        prune_kept: tokens left after pruning in each block, the class token counted (the
            reference's ``prune_kept_num``; default: its DeiT-Tiny 0.8 GFLOPs schedule);
            ``null`` prunes nothing.
        merge_kept: tokens left after merging in each block, the class token counted (the
            reference's ``merge_kept_num``; default: its DeiT-Tiny 0.8 GFLOPs schedule);
            ``null`` merges nothing.
        scale: the budget knob: every kept fraction ``f`` of the schedule becomes ``f**scale``
            (1 = as written, 0 = unreduced, more = fewer tokens).
        ref_patches: patch tokens the counts are written for (196: 224 px at patch 16); other
            patch counts keep the same fractions.
        prop_attn: proportional attention: ``similarity`` (the reference: a merged source adds
            its size times its cosine similarity), ``size`` (patch counts, as ToMe), ``none``.
        search_target: ``null`` for the schedule above; a fraction of the unreduced blocks'
            MACs to search a schedule for instead (two learnable rate distributions per block,
            trained with ``bench.finetune ... train=reducer``; the lists are then ignored).
        granularity: the search's gap between candidate kept counts (the reference's 4).
        flops_weight: λ of the search's penalty ``λ·(GMACs - target)²`` (the reference's 5).
    """

    budget_knob = "scale"
    budget_range = (0.0, 6.0)

    def __init__(
        self,
        prune_kept: Sequence[int] | None = DEIT_TINY_PRUNE,
        merge_kept: Sequence[int] | None = DEIT_TINY_MERGE,
        scale: float = 1.0,
        ref_patches: int = 196,
        prop_attn: str = "similarity",
        search_target: float | None = None,
        granularity: int = 4,
        flops_weight: float = 5.0,
    ) -> None:
        if not isinstance(ref_patches, int) or isinstance(ref_patches, bool) or ref_patches < 1:
            raise ReducerConfigError(f"DiffRate ref_patches must be a positive integer, got {ref_patches!r}")
        prune = _check_counts("prune_kept", prune_kept, ref_patches)
        merge = _check_counts("merge_kept", merge_kept, ref_patches)
        if prune is not None and merge is not None and len(prune) != len(merge):
            raise ReducerConfigError(
                f"DiffRate prune_kept has {len(prune)} blocks but merge_kept has {len(merge)}; give one count per block"
            )
        if prune is None and merge is None and search_target is None:
            raise ReducerConfigError("DiffRate needs a schedule: prune_kept and/or merge_kept, or search_target")
        scale = _positive_number("scale", scale)
        if prop_attn not in PROP_ATTN:
            raise ReducerConfigError(f"DiffRate prop_attn must be one of {', '.join(PROP_ATTN)}, got {prop_attn!r}")
        if search_target is not None:
            search_target = _positive_number("search_target", search_target, 0.0, inclusive=False)
            if search_target > 1:
                raise ReducerConfigError(
                    f"DiffRate search_target is a fraction of the MACs in (0, 1], got {search_target}"
                )
        if not isinstance(granularity, int) or isinstance(granularity, bool) or granularity < 1:
            raise ReducerConfigError(f"DiffRate granularity must be a positive integer, got {granularity!r}")
        flops_weight = _positive_number("flops_weight", flops_weight)
        super().__init__(
            prune_kept=prune,
            merge_kept=merge,
            scale=scale,
            ref_patches=ref_patches,
            prop_attn=prop_attn,
            search_target=search_target,
            granularity=granularity,
            flops_weight=flops_weight,
        )
        self.proportional_attention = False  # applied through attention_bias (the reference's sizes)
        self.prop_attn = prop_attn
        self.scale = scale
        self.search = search_target is not None
        if self.search:
            self.budget_knob = None  # the search has its own target; a budget would rescale its result
        self.search_target = search_target
        self.granularity = granularity
        self.flops_weight = flops_weight
        given = prune if prune is not None else merge
        full = [1.0] * (len(given) if given is not None else 1)  # search only: its logits give the schedule
        self._prune_fracs = [(c - 1) / ref_patches for c in prune] if prune is not None else full
        self._merge_fracs = [(c - 1) / ref_patches for c in merge] if merge is not None else full
        self._ref_patches = ref_patches
        self._bound: tuple[int, int] | None = None  # (num_patches, depth) of the bound model
        self._counts: list[tuple[int, int, int]] = []
        self._reducing: frozenset[int] = frozenset()
        self._search_key: tuple[int, ...] = ()
        self._overhead: dict[tuple[int, int], tuple[int, int]] = {}
        self.register_load_state_dict_post_hook(_refresh_after_load)

    # -- binding and the schedule ------------------------------------------------------------------
    def bind(self, info: ModelInfo) -> None:
        super().bind(info)
        n, depth = info.num_patches, info.depth
        if self.search:
            candidates = torch.arange(n, 0, -self.granularity, dtype=torch.float32)
            shape = (depth, candidates.numel())
            old = getattr(self, "prune_logits", None)
            device = old.device if old is not None else None
            if old is None or tuple(old.shape) != shape:  # a rebind to the same shape keeps what was learned
                self.prune_logits = nn.Parameter(torch.zeros(shape, device=device))
                self.merge_logits = nn.Parameter(torch.zeros(shape, device=device))
            self.register_buffer("candidates", candidates.to(device), persistent=False)
        self._bound = (n, depth)
        self.refresh_schedule()

    def _search_version(self) -> tuple[int, ...]:
        if not self.search or getattr(self, "prune_logits", None) is None:
            return ()
        return (self.prune_logits._version, self.merge_logits._version, id(self.prune_logits), id(self.merge_logits))

    def fractions(self) -> tuple[list[float], list[float]]:
        """Kept fractions of the patch tokens per block (after pruning, after merging) before
        ``scale``: the schedule as written, or the searched one (``ceil(E[candidate])``)."""
        if not self.search:
            return list(self._prune_fracs), list(self._merge_fracs)
        if self._bound is None:
            raise ReducerConfigError("DiffRate with search_target has no schedule before it is bound to a model")
        n, _ = self._bound
        with torch.no_grad():
            prune = torch.ceil(self.prune_logits.float().softmax(-1) @ self.candidates).tolist()
            merge = torch.ceil(self.merge_logits.float().softmax(-1) @ self.candidates).tolist()
        prune[0] = merge[0] = float(n)  # the first block never compresses (the reference's)
        return [min(k, n) / n for k in prune], [min(k, n) / n for k in merge]

    def refresh_schedule(self) -> None:
        """Recompute the integer schedule on the host (a sync when searched): at bind, after
        ``load_state_dict``, ``.to()`` and ``train()``/``eval()``. The forward reads plain ints."""
        if self._bound is None:
            return
        n, depth = self._bound
        prune, merge = self.fractions()
        self._fracs = (prune, merge)
        self._counts = schedule_counts(prune, merge, n, depth, self.scale)
        live = effective_fracs(prune, merge, depth)
        before = [1.0, *live[:-1]]
        self._reducing = frozenset(b for b in range(depth) if self.scale > 0 and live[b] < before[b])
        self._search_key = self._search_version()

    def schedule(self, num_patches: int | None = None) -> tuple[list[int], list[int]]:
        """``(prune_kept, merge_kept)`` in the reference's form (class token counted), ``scale``
        applied, on the bound model (or at ``num_patches``): what a config takes after a search."""
        n, depth = self._bound if self._bound is not None else (self._ref_patches, len(self._prune_fracs))
        n = num_patches or n
        prune, merge = self._current_fracs()
        return (
            [max(1, math.floor(n * f**self.scale + 0.5)) + 1 for f in resample(prune, depth)],
            [max(1, math.floor(n * f**self.scale + 0.5)) + 1 for f in resample(merge, depth)],
        )

    def _current_fracs(self) -> tuple[list[float], list[float]]:
        if self.search and not torch.compiler.is_compiling() and self._search_key != self._search_version():
            self.refresh_schedule()  # eager: an optimiser stepped since (one sync, this call only)
        if self._bound is None:
            return list(self._prune_fracs), list(self._merge_fracs)
        return self._fracs

    def _block_counts(self, num_patches: int, depth: int) -> list[tuple[int, int, int]]:
        prune, merge = self._current_fracs()
        if self._bound == (num_patches, depth):
            return self._counts
        return schedule_counts(prune, merge, num_patches, depth, self.scale)

    def notes(self) -> list[str]:
        if self._bound is None or self.search:
            return []
        n, depth = self._bound
        ref_depth = len(self._prune_fracs)
        if (n, depth) == (self._ref_patches, ref_depth):
            return []
        return [
            f"schedule written for {ref_depth} blocks and {self._ref_patches} patches, run on {depth} blocks and "
            f"{n} patches: the same kept fractions (resampled over depth)"
        ]

    # -- modes ---------------------------------------------------------------------------------------------
    def _searching(self) -> bool:
        return self.search and self.training

    def train(self, mode: bool = True) -> DiffRate:
        super().train(mode)
        self.refresh_schedule()
        return self

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's signature
        out = super()._apply(fn, recurse)
        self.refresh_schedule()
        return out

    # -- what the patch asks -----------------------------------------------------------------------------
    def reduces_at(self, block: int) -> bool:
        if self._searching():
            return block > 0
        if self.search:
            self._current_fracs()
        return block in self._reducing

    def needs(self, block: int) -> frozenset[str]:
        if not self.reduces_at(block):
            return frozenset()
        return frozenset({CLS_ATTN}) if self.info is not None and self.info.num_prefix > 0 else frozenset({ATTN})

    def reduce(self, state: TokenState, block: int) -> TokenState:
        if self._searching():
            return self._search_step(state, block)
        n = state.patch_grid[0] * state.patch_grid[1]
        live, kept, merged = self._block_counts(n, self.info.depth)[block]
        if kept == live and merged == kept:
            return state
        return diffrate_step(state, kept, merged, self.prop_attn)

    def attention_bias(self, state: TokenState, block: int) -> Tensor | None:
        bias = None
        if self.prop_attn != "none" and ATTN_SIZE in state.extra:
            bias = state.extra[ATTN_SIZE].log()[:, None, None, :]
        if MASK in state.extra:
            masked = _MaskBias.apply(state.extra[MASK])[:, None, None, :]
            bias = masked if bias is None else bias + masked
        return bias

    # -- cost model -----------------------------------------------------------------------------------------
    def token_counts(self, num_prefix: int, num_patches: int, depth: int) -> list[tuple[int, int]]:
        counts = self._block_counts(num_patches, depth)
        out = []
        for block, (live, kept, merged) in enumerate(counts):
            out.append((num_prefix + live, num_prefix + merged))
            self._overhead[(block, num_prefix + live)] = (kept, merged)
        return out

    def overhead_macs(self, block: int, n_tokens: int, dim: int, heads: int) -> int:
        """The class token's attention row (``q_cls·K``, on the fused path) and the cosine
        similarities of the merged tokens to the destinations: ``(kept - merged)·merged·C``."""
        if block not in self._reducing:
            return 0
        prefix = self.info.num_prefix if self.info else 1
        if (block, n_tokens) not in self._overhead and self._bound is not None:
            self.token_counts(prefix, self._bound[0], self._bound[1])
        kept, merged = self._overhead.get((block, n_tokens), (0, 0))
        row = n_tokens * dim if prefix > 0 else 0  # asked for at every reducing block
        live = n_tokens - prefix
        if kept == live and merged == kept:
            return row
        return row + (kept - merged) * merged * dim

    # -- the search -----------------------------------------------------------------------------------------
    def _search_step(self, state: TokenState, block: int) -> TokenState:
        """One block of the search forward: nothing is removed; tokens are sorted by class
        attention, and straight-through masks hide the pruned and merged ones from later blocks."""
        p, n_all = state.num_prefix, state.num_tokens
        n = n_all - p
        b = state.x.shape[0]
        mask = state.extra.get(MASK)
        if mask is None:
            mask = state.x.new_ones(b, n_all, dtype=torch.float32)
        attn_size = state.extra.get(ATTN_SIZE, state.size)
        live = state.extra.get(LIVE, n)
        order = rank_tokens(importance(state), p, dead=mask[:, p:] < 0.5)
        idx = torch.cat([prefix_index(state), order], dim=1)
        st = keep_tokens(state, idx)
        mask = batch_gather(mask, idx)
        attn_size = batch_gather(attn_size, idx)
        x, size, pos, source = st.x, st.size, st.pos, st.source

        kept = int(expected_kept(self.prune_logits[block], self.candidates).item())
        if kept < live:
            mask = mask * ste_mask(self.prune_logits[block], self.candidates, n, live, kept, p)[None]
        mid = min(live, kept)
        merged = int(expected_kept(self.merge_logits[block], self.candidates).item())
        if merged < mid:
            sim, to = match(x, torch.arange(p, p + mid, device=x.device).expand(b, -1), merged)
            x_dst = x[:, p : p + merged]
            sums = x_dst.scatter_add(1, to[..., None].expand(-1, -1, x.shape[-1]), x[:, p + merged : p + mid])
            count = torch.ones(b, merged, device=x.device, dtype=x.dtype).scatter_add(
                1, to, torch.ones_like(to, dtype=x.dtype)
            )
            x = torch.cat([x[:, :p], sums / count[..., None], x[:, p + merged :]], dim=1)
            factor = sim if self.prop_attn == "similarity" else torch.ones_like(sim)
            scaled = torch.cat(
                [attn_size[:, p : p + merged], attn_size[:, p + merged : p + mid] * factor.to(attn_size.dtype)], dim=1
            ).clamp_min(1)
            dst_size = scaled[:, :merged].scatter_add(1, to, scaled[:, merged:])
            attn_size = torch.cat([attn_size[:, :p], dst_size, scaled[:, merged:], attn_size[:, p + mid :]], dim=1)
            size = torch.cat(
                [
                    size[:, :p],
                    size[:, p : p + merged].scatter_add(1, to, size[:, p + merged : p + mid]),
                    size[:, p + merged :],
                ],
                dim=1,
            )
            if source is not None:
                gathered = source[:, p : p + merged].scatter_add(
                    1, to[..., None].expand(-1, -1, source.shape[-1]), source[:, p + merged : p + mid]
                )
                source = torch.cat([source[:, :p], gathered, source[:, p + merged :]], dim=1)
            pos = torch.cat([pos[:, :p], torch.full_like(pos[:, p : p + merged], -1), pos[:, p + merged :]], dim=1)
            mask = mask * ste_mask(self.merge_logits[block], self.candidates, n, mid, merged, p)[None]
        alive = (mask > 0.5).to(size.dtype)
        size = size * alive
        if source is not None:
            source = source * alive[..., None].to(source.dtype)
        extra = {**state.extra, MASK: mask, ATTN_SIZE: attn_size, LIVE: min(mid, merged)}
        return st.replace(x=x, size=size, pos=pos, source=source, extra=extra)

    def search_macs(self) -> tuple[Tensor, float]:
        """The search's differentiable MACs of the transformer blocks (the reference's formula:
        attention at the incoming count, MLP at 4x width at the outgoing count; kept counts
        ``ceil(E[candidate])`` straight-through, minimum straight-through) and the unreduced ones."""
        if self.info is None or not self.search:
            raise ReducerConfigError("search_macs needs a bound DiffRate with search_target")
        c = float(self.info.embed_dim)
        p = float(self.info.num_prefix)
        full_n = p + self.info.num_patches
        device = self.prune_logits.device
        n = torch.tensor(full_n, device=device)
        total = torch.zeros((), device=device)
        for block in range(self.info.depth):
            total = total + 4 * n * c * c + 2 * n * n * c
            if block > 0:
                kept = p + expected_kept(self.prune_logits[block].float(), self.candidates)
                merged = p + expected_kept(self.merge_logits[block].float(), self.candidates)
                n = _SteMin.apply(n, kept, merged)
            total = total + 8 * n * c * c
        base = self.info.depth * (4 * full_n * c * c + 2 * full_n * full_n * c + 8 * full_n * c * c)
        return total, base

    def extra_loss(self) -> Tensor:
        """The search's penalty ``flops_weight · (GMACs - search_target · GMACs_unreduced)²``
        (0 when not searching). The training loop adds it to the task loss (one line after the
        loss is computed: ``loss = loss + model.token_reducer.extra_loss()``)."""
        if not self.search or self.info is None:
            return torch.zeros(())
        macs, base = self.search_macs()
        return self.flops_weight * (macs / 1e9 - self.search_target * base / 1e9) ** 2


def _refresh_after_load(module: DiffRate, incompatible: Any) -> None:
    """``load_state_dict`` post-hook: loaded rate distributions decide the schedule."""
    module.refresh_schedule()
