"""PiToMe (Tran et al., NeurIPS 2024, "Accelerating Transformers with Spectrum-Preserving Token
Merging", arXiv 2405.16148): protect informative tokens, merge the high-energy ones.

Written from the paper and its reference code (github.com/hchautran/PiToMe, ``algo/pitome/
merge.py`` ``pitome_vision`` / ``pitome`` / ``pitome_bsm`` and ``algo/pitome/patch/timm.py`` /
``deit.py``; the OpenToMe port ``opentome/timm/pitome.py`` agrees on every point below).

In every block, between the attention residual and the MLP, on the block's keys averaged over
heads (``k.mean(1)``), with the ``T`` non-prefix tokens only:

1. cosine similarity ``S = k̂ k̂ᵀ`` (``T×T``, the diagonal included) and the energy score
   ``E_i = mean_j ELU(S_ij − m_l, α)`` with the margin ``m_l = m·(1 − l/L)`` in block ``l``
   of ``L`` (``m = 0.75``, ``α = 1``: the reference's schedule ``.75 − .75·l/L``);
2. tokens sorted by energy, highest first; ``r = floor(T − T·ratio)`` tokens are merged away;
3. the first ``ceil(L/2)`` blocks run ToMe's bipartite soft matching on the energy-sorted
   alternation (set A = sorted positions 0, 2, 4…, set B = 1, 3, 5…; the ``r`` A tokens most
   similar to their best B partner merge into it); the later blocks take the ``2r``
   highest-energy tokens, alternate them into A and B, merge every A token into its most
   similar B token, and keep the remaining ``T − 2r`` (low-energy, informative) tokens as they
   are;
4. merging is the size-weighted average, sizes add up (the reference's ``merge_wavg``).

Proportional attention is off, as in the reference's DeiT/timm patch (``prop_attn=False``;
sizes are tracked but not passed to attention); ``prop_attn=True`` is the variant that passes
``log(size)``. ``ratio`` (the fraction of the non-prefix tokens kept in each block; compounds
over the blocks) is the budget knob; the reference's ``main_ic.py`` defaults it to 0.9125
(its README example uses 0.95, its DeiT sweep 0.9-0.975).

Deviations from the reference, each deliberate:

- every prefix token (class, distillation, registers) is protected and left out of the
  energy, not only the class token (the reference would merge a distillation token); prefix
  tokens stay first, the other tokens follow as ``[unmerged or protected, destinations]`` in
  the reference's order;
- ``r`` is capped at ``T // 2`` (both matchings need it; the reference fails beyond it), and
  ``ratio`` below 0.5 is refused, where it would never apply;
- sorting by energy is stable (ties in token order); the reference's unstable ``argsort`` can
  order tied tokens differently from run to run;
- the number of leading BSM blocks (``bsm_blocks``), the margin and α are arguments; the
  reference fixes them at ``ceil(L/2)``, 0.75 and 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from methods.base import KEYS, ModelInfo, ReducerConfigError, TokenReducer, TokenState
from methods.tokens import batch_gather, head_mean, merge_all, token_range, unit_rows


def pitome_r(num_tokens: int, ratio: float) -> int:
    """Tokens merged away from ``num_tokens`` mergeable ones: the reference's
    ``floor(T − T·ratio)``, capped at ``T // 2``."""
    t = int(num_tokens)
    return max(0, min(math.floor(t - t * ratio), t // 2))


def margin_schedule(margin: float, depth: int) -> list[float]:
    """The energy margin of each block: ``margin·(1 − l/depth)`` (reference: ``.75 − .75·l/L``)."""
    return [margin - margin * (block / depth) for block in range(depth)]


def energy_scores(metric: Tensor, margin: float, alpha: float = 1.0) -> tuple[Tensor, Tensor]:
    """Energy ``E_i = mean_j ELU(cos(m_i, m_j) − margin, α)`` of each token of ``metric``
    ``(B, T, d)`` (the mean includes ``j = i``), and the cosine similarities ``(B, T, T)``."""
    unit = unit_rows(metric)
    sim = unit @ unit.transpose(-1, -2)
    return elu_from_exp_(sim - margin, alpha).mean(dim=-1), sim


def elu_from_exp_(x: Tensor, alpha: float = 1.0) -> Tensor:
    """``ELU(x, α) = x`` for ``x > 0``, ``α(eˣ − 1)`` otherwise, written with ``exp``, in place
    of ``x`` (which it returns).

    ``F.elu`` calls ``expm1``, which PyTorch's CPU kernels evaluate one element at a time; the
    energy's ``T×T`` ELU was a tenth of a batch-32 DeiT-Tiny forward. ``exp`` is vectorised
    (17× faster here). ``eˣ − 1`` loses relative precision only where ``|x|`` is below about
    1e-7, where the term is itself that small next to a mean of ~200 terms. In place because
    the map is a fresh ``B×T×T`` temporary: one allocation and write pass fewer per block,
    the same values (``max(x, 0) + min(eˣ − 1, 0)`` either way)."""
    neg = x.clamp_max(0).exp_().sub_(1)
    if alpha != 1.0:
        neg = neg.mul_(alpha)
    return x.clamp_min_(0).add_(neg)


def _cross(sim: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``sim[b, rows[b]][:, cols[b]]`` for ``sim`` (B, T, T), ``rows`` (B, R), ``cols`` (B, K)."""
    picked = batch_gather(sim, rows)
    return picked.gather(2, cols[:, None, :].expand(-1, rows.shape[1], -1))


def pitome_groups(
    metric: Tensor, r: int, num_prefix: int, margin: float, alpha: float = 1.0, bsm: bool = False
) -> tuple[Tensor, int]:
    """Output slot of every token under one PiToMe step; ``(group (B, N), num_out)``.

    ``metric`` is ``(B, N, d)`` with the ``num_prefix`` prefix tokens first; they keep slots
    ``0..num_prefix-1``. The other slots follow the reference's output order: first the tokens
    left alone (``bsm``: A tokens not merged, in edge order; otherwise the ``T − 2r``
    lowest-energy tokens, in energy order), then set B, into which the merged A tokens fall.
    """
    bsz, n, _ = metric.shape
    p = int(num_prefix)
    t = int(n) - p
    energy, sim = energy_scores(metric[:, p:], margin, alpha)
    order = energy.argsort(dim=-1, descending=True, stable=True)  # positions among the T tokens
    if bsm:
        a, b = order[:, 0::2], order[:, 1::2]
        node_max, node_idx = _cross(sim, a, b).max(dim=-1)
        edge = node_max.argsort(dim=-1, descending=True)
        src, alone = a.gather(1, edge[:, :r]), a.gather(1, edge[:, r:])
        dst_of_src = node_idx.gather(1, edge[:, :r])
    else:
        alone = order[:, 2 * r :]
        src, b = order[:, 0 : 2 * r : 2], order[:, 1 : 2 * r : 2]
        dst_of_src = _cross(sim, src, b).argmax(dim=-1)
    n_alone, n_dst = alone.shape[1], b.shape[1]
    dev = metric.device
    slots = torch.empty(bsz, t, dtype=torch.long, device=dev)
    slots.scatter_(1, alone, token_range(p, p + n_alone, dev).expand(bsz, -1))
    slots.scatter_(1, b, token_range(p + n_alone, p + n_alone + n_dst, dev).expand(bsz, -1))
    slots.scatter_(1, src, p + n_alone + dst_of_src)
    group = torch.cat([token_range(0, p, dev).expand(bsz, -1), slots], dim=1)
    return group, p + n_alone + n_dst


def pitome_merge(state: TokenState, ratio: float, margin: float, alpha: float = 1.0, bsm: bool = False) -> TokenState:
    """One PiToMe step on a state whose ``keys`` tap is set (size-weighted merge)."""
    r = pitome_r(int(state.num_tokens) - state.num_prefix, ratio)
    if r <= 0:
        return state
    group, num_out = pitome_groups(head_mean(state.keys), r, state.num_prefix, margin, alpha, bsm)
    return merge_all(state, group, num_out)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class PiToMe(TokenReducer):
    """PiToMe: energy-ordered BSM in the first half of the blocks, then merge only the
    high-energy tokens and protect the rest.

    Args:
        ratio: fraction of the non-prefix tokens kept in every block, ``r = floor(T − T·ratio)``
            merged away (the budget knob; in [0.5, 1], compounds over the blocks).
        margin: energy margin of the first block, ``m_l = margin·(1 − l/depth)`` in block ``l``
            (the reference's 0.75); in [0, 1).
        alpha: the ELU's α in the energy score (the reference's 1.0); positive.
        bsm_blocks: how many leading blocks use the energy-ordered bipartite soft matching
            (None: ``ceil(depth / 2)``, the reference); the rest merge only high-energy tokens.
        prop_attn: proportional attention (``log(size)`` on the logits); off in the reference's
            DeiT patch, which tracks sizes for the weighted merge only.
    """

    budget_knob = "ratio"
    budget_range = (0.5, 1.0)

    def __init__(
        self,
        ratio: float = 0.9125,
        margin: float = 0.75,
        alpha: float = 1.0,
        bsm_blocks: int | None = None,
        prop_attn: bool = False,
    ) -> None:
        if not _is_number(ratio) or not 0.5 <= ratio <= 1.0:
            raise ReducerConfigError(
                f"PiToMe ratio (the fraction of tokens kept per block) must be in [0.5, 1], got {ratio!r}"
            )
        if not _is_number(margin) or not 0.0 <= margin < 1.0:
            raise ReducerConfigError(f"PiToMe margin must be in [0, 1), got {margin!r}")
        if not _is_number(alpha) or not alpha > 0:
            raise ReducerConfigError(f"PiToMe alpha (the ELU's α) must be positive, got {alpha!r}")
        if bsm_blocks is not None and (
            not isinstance(bsm_blocks, int) or isinstance(bsm_blocks, bool) or bsm_blocks < 0
        ):
            raise ReducerConfigError(f"PiToMe bsm_blocks must be a non-negative integer or null, got {bsm_blocks!r}")
        if not isinstance(prop_attn, bool):
            raise ReducerConfigError(f"PiToMe prop_attn must be true or false, got {prop_attn!r}")
        super().__init__(ratio=ratio, margin=margin, alpha=alpha, bsm_blocks=bsm_blocks, prop_attn=prop_attn)
        self.ratio = float(ratio)
        self.alpha = float(alpha)
        self.margins: list[float] = []
        self.num_bsm = 0

    def bind(self, info: ModelInfo) -> None:
        bsm_blocks = self.hparams["bsm_blocks"]
        if bsm_blocks is not None and bsm_blocks > info.depth:
            raise ReducerConfigError(f"PiToMe bsm_blocks={bsm_blocks} exceeds the model's {info.depth} blocks")
        super().bind(info)
        self.margins = margin_schedule(float(self.hparams["margin"]), info.depth)
        self.num_bsm = math.ceil(info.depth / 2) if bsm_blocks is None else bsm_blocks

    def reduces_at(self, block: int) -> bool:
        return self.ratio < 1.0 and block < len(self.margins)

    def needs(self, block: int) -> frozenset[str]:
        return frozenset({KEYS})

    def reduce(self, state: TokenState, block: int) -> TokenState:
        return pitome_merge(state, self.ratio, self.margins[block], self.alpha, bsm=block < self.num_bsm)

    def token_counts(self, num_prefix: int, num_patches: int, depth: int) -> list[tuple[int, int]]:
        n = num_prefix + num_patches
        counts = []
        for _ in range(depth):
            out = n - pitome_r(n - num_prefix, self.ratio)
            counts.append((n, out))
            n = out
        return counts

    def overhead_macs(self, block: int, n_tokens: int, dim: int, heads: int) -> int:
        """The energy's cosine similarities of the non-prefix tokens: ``T·T·d_head``."""
        prefix = self.info.num_prefix if self.info else 1
        t = n_tokens - prefix
        if not self.reduces_at(block) or pitome_r(t, self.ratio) <= 0:
            return 0
        return t * t * (dim // heads)
