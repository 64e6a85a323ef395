"""Zero-TPrune (Wang, Dedhia & Jha, CVPR 2024, "Zero-TPrune: Zero-Shot Token Pruning through
Leveraging of the Attention Graph in Pre-Trained Transformers", arXiv 2305.17328): rank tokens
by a weighted PageRank over the attention graph, drop the redundant ones among the unimportant
half by key similarity, then drop the least important.

There is no official code. Written from the paper as far as it could be read here: its
abstract and project page (jha-lab.github.io/zerotprune), and two detailed public write-ups of
its method section that quote its equations and settings (a paper note with the WPR and EIR/VHF
equations, the ``[0.01, 0.7]`` variance range, the ``sqrt(N)`` class-token initialisation, the
iteration counts, Sequential-U partitioning and the I'-S-I order; and a re-implementation of the
importance score in a video-reuse code base, whose comments quote the paper's iteration counts
and its Fig. 16 variance range). Cross-checked, read only, against the public
re-implementation MahdiarKhodabakhshi/Zero-TPrune (``tokenrank_vit.py``: its Sequential-U
partition agrees; its importance is a row-normalised ``exp(A/τ)`` mean, not WPR) and the
authors' early course-project repository Hongjiew/Transformer_pruning (``tokenrank_vit.py``,
which predates the paper's algorithm and has no WPR).

Every pruning layer sits in a block between the attention residual and the MLP and reads the
block's attention probabilities ``A`` (``B, H, N, N``; rows are queries and sum to 1) and keys:

1. **WPR** (weighted PageRank), per head: the attention matrix is the adjacency matrix of a
   directed graph; a token's importance is the attention it receives from important tokens.
   Start from ``s⁰`` uniform except the prefix (class) tokens, which get ``sqrt(N)`` times the
   others' score (the paper's "Zero-TPrune"; without a prefix token it is "Zero-TPrune-uni"),
   normalised to sum to 1, and iterate ``s ← Aᵀ s`` a fixed number of times (no damping; ``Aᵀ``
   is column-stochastic so ``s`` stays a distribution): 30 iterations in the first three
   blocks, 5 in the middle ones, 1 in the last three (the paper: 30-50, 5-10 and 1).
2. **VHF** (variance-based head filter): a head whose score distribution is nearly uniform or
   collapsed onto a few tokens misleads; heads whose patch-score variance lies outside
   ``[v_min, v_max] = [0.01, 0.7]`` are left out. **EIR** (emphasising informative region):
   the remaining heads are aggregated by a root mean square,
   ``s(x_i) = sqrt(Σ_h m_h s_h(x_i)² / Σ_h m_h)``, so a token very important in one or two
   heads outranks one that is lukewarm in all of them.
3. **I'-S-I order**: the pruning layer runs an I'-stage (one WPR vote, step 1-2 with one
   iteration, nothing dropped), then the S-stage, then the I-stage, so that a large group of
   mutually similar background tokens cannot vote itself important ("overwhelming of the major
   group").
4. **S-stage**: the patch tokens are sorted by the I'-importance and split in two
   (Sequential-U): set A = the less important half, set B = the rest. Each A token finds its
   most similar B token (cosine similarity of the tokens' keys); the ``r_s`` A tokens with the
   most similar partners are dropped (not merged: pruned tokens keep the backbone unchanged).
5. **I-stage**: WPR (steps 1-2, full iteration count) on the attention among the tokens left
   after the S-stage (rows renormalised: exactly the softmax the block would have computed
   over those keys alone); the ``r_i`` least important patch tokens are dropped.

Kept tokens are copied exactly, in token order, prefix first. ``r`` tokens are pruned in each
block (ToMe's constant-``r`` layout; a fractional ``r`` is spread by cumulative rounding so the
budget can be met finely), ``r_s = round(s_share · r)`` of them by the S-stage and the rest by
the I-stage. ``r`` is the budget knob. All shapes are static: ``r_s`` and ``r_i`` follow from the
token count alone, never from values, so a forward is one graph without host syncs.

Proportional attention is off (``prop_attn=False``): pruning never changes a token's size, so
it would add ``log 1 = 0`` anyway; the switch exists for uniformity with the other methods.

Deviations from the reference, each deliberate (the paper leaves these open, or they could not
be read here):

- **schedule**: the paper's own per-model pruning configurations (Zero-TP-a and the others; a
  summary says it tunes them by Monte Carlo simulation) could not be read here; this uses ToMe's
  layout (the same ``r`` pruned in every block, the fine-tuning-free baseline the paper
  compares against) and defaults ``r`` to 11, which puts a 12-block, 196-patch DeiT-S at
  0.66 of its MACs (DeiT-Tiny too), the paper's headline operating point (-34.7% FLOPs); a
  list of per-block counts replays any other configuration;
- **S/I split**: how many tokens each stage prunes is a choice here (``s_share = 0.5``);
- **iteration counts**: the lower ends of the paper's ranges (30, 5, 1), cheaper and, by the
  paper's convergence study, converged; "first/last three" means blocks ``0-2`` and
  ``depth-3 .. depth-1`` (the first three win where they overlap, in models under 6 blocks);
- **variance scale of VHF**: the paper's thresholds cannot apply to scores that sum to 1 over
  ~200 tokens (every variance would be below 0.01 and every head filtered), so the variance is
  taken of the head's *patch* scores divided by their mean (a scale-free spread; prefix
  tokens, which collect the class token's boost and attention sinks, are left out); when the
  filter leaves no head for an image, all heads are aggregated (the paper does not say);
- **I'-stage**: one WPR iteration from the same initialisation, aggregated with EIR and VHF
  like the I-stage (the paper: one round of voting);
- **I-stage graph**: the attention among the S-stage's survivors with its rows renormalised
  (the paper runs the I-stage after the S-stage but does not say whether it renormalises);
- **partition sizes**: set A has ``floor(T/2)`` tokens and ``r_s`` is capped there; ties in
  importance and similarity are broken by token order (stable sorts);
- **key vector**: a token's key is the concatenation of its per-head keys (the row of the key
  matrix ``K = X W_k``), not the head mean;
- **prefix tokens**: every prefix token (class, distillation, registers) gets the ``sqrt(N)``
  initial boost and is never pruned; ``N`` is the current token count;
- **caps**: at most ``T - 1`` of the ``T`` patch tokens are pruned in a block (one always
  stays); a block asked for more is capped, and :meth:`ZeroTPrune.notes` says where.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from methods.base import ATTN, KEYS, ModelInfo, ReducerConfigError, TokenReducer, TokenState
from methods.tokens import (
    batch_gather,
    keep_tokens,
    prefix_index,
    shape_constant,
    token_range,
    unit_rows,
)

WPR_ITERS = (30, 5, 1)
"""WPR iterations in the first three blocks, the middle blocks and the last three blocks."""
VAR_RANGE = (0.01, 0.7)
"""The paper's VHF range (its Fig. 16)."""
PRE_RANK_ITERS = 1
"""WPR iterations of the I'-stage (one round of voting)."""


# -- schedule ------------------------------------------------------------------------------------------
def prune_schedule(r: float | Sequence[int], depth: int) -> list[int]:
    """Tokens to prune in each block: a list is used as given (zero-padded to ``depth``); a
    number ``r`` is spread by cumulative rounding so the mean per block is exactly ``r``."""
    if isinstance(r, (int, float)):
        return [round((i + 1) * r) - round(i * r) for i in range(depth)]
    counts = [int(v) for v in r]
    if len(counts) > depth:
        raise ReducerConfigError(f"Zero-TPrune r lists {len(counts)} blocks but the model has {depth}")
    return counts + [0] * (depth - len(counts))


def split_counts(r: int, num_patches: int, s_share: float) -> tuple[int, int]:
    """``(r_s, r_i)``: tokens the S-stage and the I-stage prune of ``num_patches`` patch tokens.

    ``r`` is capped at ``num_patches - 1`` (one patch token always stays), ``r_s =
    round(s_share · r)`` (halves up) at set A's size ``num_patches // 2``, ``r_i`` is the rest.
    """
    t = int(num_patches)
    r = max(0, min(int(r), t - 1))
    r_s = min(math.floor(s_share * r + 0.5), t // 2)
    return r_s, r - r_s


def wpr_schedule(iters: Sequence[int], depth: int) -> list[int]:
    """WPR iterations per block: ``iters[0]`` in blocks 0-2, ``iters[2]`` in the last three,
    ``iters[1]`` between (the first three win where they overlap)."""
    early, middle, late = (int(v) for v in iters)
    return [early if b < 3 else late if b >= depth - 3 else middle for b in range(depth)]


# -- I-stage: weighted PageRank, head filter, aggregation ---------------------------------------------
def initial_scores(attn: Tensor, num_prefix: int, cls_boost: bool) -> Tensor:
    """``s⁰`` (B, H, N): 1 per token, ``sqrt(N)`` per prefix token when ``cls_boost``, summing to 1.
    A function of the shape alone: eager forwards take it from a cache (two per block)."""
    b, h, n, _ = attn.shape
    return _initial_scores(int(n), int(num_prefix) if cls_boost else 0, attn.dtype, attn.device).expand(b, h, n)


@shape_constant()
def _initial_scores(n: int, boosted: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    s = torch.ones(n, dtype=dtype, device=device)
    if boosted > 0:
        s[:boosted] = math.sqrt(n)
    return s / s.sum()


def weighted_page_rank(attn: Tensor, init: Tensor, iters: int) -> Tensor:
    """``iters`` steps of ``s ← Aᵀ s`` per head: ``s_i ← Σ_j A[j, i] s_j`` (what token ``j``
    gives token ``i``, weighted by ``j``'s own score). ``attn`` (B, H, N, N), ``init`` (B, H, N).

    A row vector per head for the whole loop, one ``bmm`` per step on the heads flattened into
    the batch: the batched product ``matmul`` would make of the 4-D operands, without its
    reshapes in every one of up to 30 steps (the same kernel, the same bits)."""
    b, h, n, _ = attn.shape
    graph = attn.reshape(b * h, n, n)
    s = init.reshape(b * h, 1, n)
    for _ in range(iters):
        s = torch.bmm(s, graph)
    return s.view(b, h, n)


def head_variance(patch_scores: Tensor) -> Tensor:
    """Scale-free spread of each head's scores (B, H, T) -> (B, H): the population variance of
    the scores divided by their mean (0 for a uniform head, ``T - 1`` for a one-token head)."""
    rel = patch_scores / patch_scores.mean(dim=-1, keepdim=True).clamp_min(torch.finfo(patch_scores.dtype).tiny)
    return rel.var(dim=-1, correction=0)


def aggregate_heads(scores: Tensor, num_prefix: int, var_range: Sequence[float] | None) -> Tensor:
    """EIR over the heads VHF keeps: ``sqrt(Σ_h m_h s_h² / Σ_h m_h)`` (B, H, N) -> (B, N).

    ``m_h`` is 1 for a head whose patch-score variance (:func:`head_variance`) lies in
    ``var_range`` (None: every head); an image whose heads are all filtered uses all of them.
    """
    if var_range is None:
        keep = torch.ones(scores.shape[:2], dtype=scores.dtype, device=scores.device)
    else:
        # ``clamp == var`` is ``lo <= var <= hi`` (NaN in neither), and ``any`` is a positive count
        # of 0/1 flags: the same masks in five operators instead of seven, twice per pruning block
        # (a float 1.0 in ``where``: fvcore's JIT tracer has no ``where`` with a bool scalar)
        var = head_variance(scores[..., num_prefix:])
        inside = var.clamp(var_range[0], var_range[1]) == var
        keep = torch.where(inside.any(-1, keepdim=True), inside.to(scores.dtype), 1.0)
    return ((scores.square() * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)).sqrt()


def token_importance(
    attn: Tensor, num_prefix: int, iters: int, var_range: Sequence[float] | None, cls_boost: bool
) -> Tensor:
    """The I-stage score (B, N) of every token: WPR per head, then VHF and EIR."""
    s = weighted_page_rank(attn, initial_scores(attn, num_prefix, cls_boost), iters)
    return aggregate_heads(s, num_prefix, var_range)


def kept_page_rank(attn: Tensor, dropped: Tensor, num_prefix: int, iters: int, cls_boost: bool) -> Tensor:
    """WPR (B, H, N) on the attention among the tokens left after dropping ``dropped`` (B, R)
    (token positions), its rows renormalised: the softmax over the kept keys alone, since a
    softmax restricted to a subset is the full one rescaled. Only the kept positions of the
    result mean anything (the caller gathers them).

    The renormalised sub-matrix is never built: copying every head's kept rows, then their kept
    columns, then dividing every entry wrote the map three times per block, while the steps
    only read it. Each step instead scales the scores by
    ``w = keep / (row mass on the kept keys)`` and multiplies by the whole map,
    ``s ← (s ⊙ w) A``: a dropped token has weight 0, so it votes for nobody, and what it
    receives is never read. The scores equal the sub-matrix's to float rounding (tested); the
    products run over all ``N`` tokens (:meth:`ZeroTPrune.overhead_macs` counts them so)."""
    b, h, n, _ = attn.shape
    m = int(n) - int(dropped.shape[1])
    keep = torch.ones(b, n, dtype=attn.dtype, device=attn.device).scatter_(1, dropped, 0.0)
    graph = attn.reshape(b * h, n, n)
    # the row mass as a row vector times the transposed map: the same products as ``A @ keep``,
    # but the CPU BLAS runs this layout about 8x faster at batch 32 (and as fast at batch 1)
    mass = torch.bmm(keep[:, None, :], attn.reshape(b, h * n, n).transpose(1, 2)).view(b, h, n)
    w = (keep[:, None, :] / mass.clamp_min(torch.finfo(attn.dtype).tiny)).view(b * h, 1, n)
    s = _kept_initial_scores(int(n), m, int(num_prefix) if cls_boost else 0, attn.dtype, attn.device)
    s = s.expand(b * h, 1, n)
    for _ in range(iters):
        s = torch.bmm(s * w, graph)
    return s.view(b, h, n)


@shape_constant()
def _kept_initial_scores(n: int, m: int, boosted: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """:func:`initial_scores` of ``m`` kept tokens laid out over ``n`` positions: the prefix
    first, every other position the patch score (a dropped position's value is never used)."""
    s = _initial_scores(m, boosted, dtype, device)
    return torch.cat([s, s[-1:].expand(n - m)]) if n > m else s


# -- S-stage: importance-guided partition, matching on keys --------------------------------------------
def similarity_prune(importance: Tensor, keys: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Positions of the patch tokens the S-stage keeps (B, T - r), in token order, and of
    those it drops (B, r).

    ``importance`` (B, T) and ``keys`` (B, T, C) are the patch tokens'. Sequential-U: set A is
    the ``T // 2`` least important, set B the rest; each A token's best cosine similarity to a
    B token is its edge, and the ``r`` A tokens with the strongest edges are dropped.
    """
    b, t = importance.shape
    order = importance.argsort(dim=-1, stable=True)  # least important first
    half = t // 2
    set_a = order[:, :half]
    ranked = batch_gather(unit_rows(keys.float()), order)  # both sets in one copy: A rows, then B rows
    edge = (ranked[:, :half] @ ranked[:, half:].transpose(1, 2)).amax(dim=-1)
    dropped = set_a.gather(1, edge.argsort(dim=-1, descending=True, stable=True)[:, :r])
    pos = token_range(0, t, importance.device).expand(b, -1)
    # dropped positions move past the end, so sorting puts the kept ones first, in token order
    return pos.scatter(1, dropped, dropped + t).sort(dim=-1).values[:, : t - r], dropped


# -- one pruning layer --------------------------------------------------------------------------------
def zerotprune_step(
    state: TokenState,
    r_s: int,
    r_i: int,
    iters: int,
    var_range: Sequence[float] | None = VAR_RANGE,
    cls_boost: bool = True,
) -> TokenState:
    """One I'-S-I pruning layer on a state whose ``attn`` (and, if ``r_s > 0``, ``keys``) taps
    are set: ``r_s`` patch tokens dropped by similarity, then ``r_i`` by importance."""
    p = state.num_prefix
    attn = state.attn.float()
    b, h, n, _ = attn.shape
    t = int(n) - p
    if r_s > 0:
        pre = token_importance(attn, p, PRE_RANK_ITERS, var_range, cls_boost)
        keys = state.keys[:, :, p:].transpose(1, 2).reshape(b, t, -1)  # patch tokens' keys, heads concatenated
        kept, dropped = similarity_prune(pre[:, p:], keys, r_s)  # patch positions; kept in token order
    else:
        kept = token_range(0, t, attn.device).expand(b, -1)
    if r_i > 0:
        if r_s == 0:
            score = token_importance(attn, p, iters, var_range, cls_boost)[:, p:]
        else:
            s = kept_page_rank(attn, dropped + p, p, iters, cls_boost)
            idx = torch.cat([prefix_index(state), kept + p], dim=1)
            score = aggregate_heads(s.gather(2, idx[:, None, :].expand(b, h, -1)), p, var_range)[:, p:]
        top = score.argsort(dim=-1, descending=True, stable=True)[:, : t - r_s - r_i]
        kept = kept.gather(1, top.sort(dim=-1).values)
    return keep_tokens(state, torch.cat([prefix_index(state), kept + p], dim=1))


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class ZeroTPrune(TokenReducer):
    """Zero-TPrune: weighted-PageRank importance (I-stage) and key-similarity pruning among the
    unimportant half (S-stage), in the order I'-S-I, ``r`` tokens in every block.

    Args:
        r: patch tokens pruned per block (the budget knob): a number (fractional values are
            spread by cumulative rounding, the mean per block is ``r``) or a list of per-block
            counts (zero-padded to the depth).
        s_share: fraction of each block's ``r`` pruned by the S-stage, ``round(s_share · r)``;
            the I-stage prunes the rest (in [0, 1]).
        wpr_iters: WPR iterations in the first three blocks, the middle blocks and the last
            three (three positive integers; the paper's ranges are 30-50, 5-10 and 1).
        var_range: VHF's ``[v_min, v_max]`` on the scale-free patch-score variance (the paper's
            ``[0.01, 0.7]``); null turns the head filter off (EIR over every head).
        cls_boost: start the prefix tokens' WPR score at ``sqrt(N)`` times the others' (the
            paper's Zero-TPrune); false starts uniform (Zero-TPrune-uni).
        prop_attn: proportional attention; pruned tokens keep size 1, so it changes nothing.
    """

    budget_knob = "r"
    budget_range = (0.0, 60.0)

    def __init__(
        self,
        r: float | Sequence[int] = 11,
        s_share: float = 0.5,
        wpr_iters: Sequence[int] = WPR_ITERS,
        var_range: Sequence[float] | None = VAR_RANGE,
        cls_boost: bool = True,
        prop_attn: bool = False,
    ) -> None:
        if _is_number(r):
            if not r >= 0:
                raise ReducerConfigError(f"Zero-TPrune r (tokens pruned per block) must be >= 0, got {r!r}")
        elif isinstance(r, Sequence) and not isinstance(r, str):
            if not all(_is_count(v) and v >= 0 for v in r):
                raise ReducerConfigError(f"Zero-TPrune r as a list must hold non-negative integers, got {list(r)!r}")
            r = [int(v) for v in r]
        else:
            raise ReducerConfigError(f"Zero-TPrune r must be a number or a list of per-block counts, got {r!r}")
        if not _is_number(s_share) or not 0.0 <= s_share <= 1.0:
            raise ReducerConfigError(f"Zero-TPrune s_share must be in [0, 1], got {s_share!r}")
        if (
            isinstance(wpr_iters, str)
            or not isinstance(wpr_iters, Sequence)
            or len(wpr_iters) != 3
            or not all(_is_count(v) and v >= 1 for v in wpr_iters)
        ):
            raise ReducerConfigError(
                f"Zero-TPrune wpr_iters must be three positive integers (first three, middle, last three "
                f"blocks), got {wpr_iters!r}"
            )
        if var_range is not None and (
            isinstance(var_range, str)
            or not isinstance(var_range, Sequence)
            or len(var_range) != 2
            or not all(_is_number(v) for v in var_range)
            or not 0.0 <= var_range[0] <= var_range[1]
        ):
            raise ReducerConfigError(
                f"Zero-TPrune var_range must be [v_min, v_max] with 0 <= v_min <= v_max, or null, got {var_range!r}"
            )
        if not isinstance(cls_boost, bool):
            raise ReducerConfigError(f"Zero-TPrune cls_boost must be true or false, got {cls_boost!r}")
        if not isinstance(prop_attn, bool):
            raise ReducerConfigError(f"Zero-TPrune prop_attn must be true or false, got {prop_attn!r}")
        super().__init__(
            r=r,
            s_share=s_share,
            wpr_iters=[int(v) for v in wpr_iters],
            var_range=None if var_range is None else [float(v) for v in var_range],
            cls_boost=cls_boost,
            prop_attn=prop_attn,
        )
        self.r = r
        self.s_share = float(s_share)
        self.var_range = self.hparams["var_range"]
        self.cls_boost = cls_boost
        self.schedule: list[int] = []
        self.iters: list[int] = []

    def bind(self, info: ModelInfo) -> None:
        self.schedule = prune_schedule(self.r, info.depth)
        self.iters = wpr_schedule(self.hparams["wpr_iters"], info.depth)
        super().bind(info)

    def notes(self) -> list[str]:
        if self.info is None:
            return []
        notes = []
        t = self.info.num_patches
        capped = []
        for block, r in enumerate(self.schedule):
            r_s, r_i = split_counts(r, t, self.s_share)
            if r_s + r_i < r:
                capped.append(f"{block} ({r} -> {r_s + r_i})")
            t -= r_s + r_i
        if capped:
            notes.append(f"Zero-TPrune keeps one patch token: r capped in blocks {', '.join(capped)}")
        if self.info.num_prefix == 0 and self.cls_boost:
            notes.append("Zero-TPrune: no class token, so WPR starts uniform (the paper's Zero-TPrune-uni)")
        return notes

    def reduces_at(self, block: int) -> bool:
        return block < len(self.schedule) and self.schedule[block] > 0

    def needs(self, block: int) -> frozenset[str]:
        return frozenset({ATTN, KEYS}) if self.s_share > 0 else frozenset({ATTN})

    def reduce(self, state: TokenState, block: int) -> TokenState:
        r_s, r_i = split_counts(self.schedule[block], int(state.num_tokens) - state.num_prefix, self.s_share)
        if r_s + r_i == 0:
            return state
        return zerotprune_step(state, r_s, r_i, self.iters[block], self.var_range, self.cls_boost)

    def token_counts(self, num_prefix: int, num_patches: int, depth: int) -> list[tuple[int, int]]:
        t = num_patches
        counts = []
        for r in prune_schedule(self.r, depth):
            r_s, r_i = split_counts(r, t, self.s_share)
            counts.append((num_prefix + t, num_prefix + t - r_s - r_i))
            t -= r_s + r_i
        return counts

    def overhead_macs(self, block: int, n_tokens: int, dim: int, heads: int) -> int:
        """The I'-stage's one WPR step (``H·N²``), the S-stage's A-to-B similarities
        (``|A|·|B|·C``) and the I-stage's WPR steps: on the whole map, ``iters·H·N²``, plus one
        ``H·N²`` for the kept keys' row mass when the S-stage dropped tokens
        (:func:`kept_page_rank`)."""
        if not self.reduces_at(block):
            return 0
        prefix = self.info.num_prefix if self.info else 1
        t = n_tokens - prefix
        r_s, r_i = split_counts(self.schedule[block], t, self.s_share)
        macs = 0
        if r_s > 0:
            macs += PRE_RANK_ITERS * heads * n_tokens * n_tokens + (t // 2) * (t - t // 2) * dim
        if r_i > 0:
            macs += (self.iters[block] + (r_s > 0)) * heads * n_tokens * n_tokens
        return macs
