"""Token Merging (Bolya et al., ICLR 2023): bipartite soft matching in every block.

Written from the paper's algorithm: the metric is the block's keys averaged over heads,
similarity is cosine, tokens alternate into sets A (even) and B (odd), each A token picks its
most similar B token, and the ``r`` most similar A tokens are merged into their partners by
size-weighted average. Prefix tokens are protected (never a source, never a destination).
One deliberate difference in layout: prefix tokens are kept at the front (the paper's
``[unmerged A, B]`` order would move a distillation token away from index 1, where timm's
DeiT head reads it); the other tokens keep the paper's order. Attention is permutation
equivariant, so this does not change any prediction.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from methods.base import KEYS, ModelInfo, ReducerConfigError, TokenReducer, TokenState
from methods.tokens import head_mean, merge_all, shape_constant


def tome_schedule(r: float | Sequence[int], depth: int, inflection: float = 0.0) -> list[int]:
    """Tokens to merge per block.

    - a list: used as given (padded with zeros to the depth);
    - ``inflection != 0``: ToMe's linear schedule, from ``r(1-inflection)`` up to
      ``r(1+inflection)`` across the blocks (the paper's ``(r, inflection)`` form);
    - a number: constant ``r``; a fractional ``r`` is spread by cumulative rounding so the
      average per block is exactly ``r`` (lets budget matching hit a MACs target finely).
    """
    if isinstance(r, Sequence) and not isinstance(r, str):
        rs = [int(v) for v in r]
        if any(v < 0 for v in rs):
            raise ReducerConfigError(f"ToMe r must be >= 0 in every block, got {rs}")
        if len(rs) > depth:
            raise ReducerConfigError(f"ToMe schedule has {len(rs)} entries but the model has {depth} blocks")
        return rs + [0] * (depth - len(rs))
    if not isinstance(r, (int, float)) or isinstance(r, bool):
        raise ReducerConfigError(f"ToMe r must be a number or a list, got {r!r}")
    if r < 0:
        raise ReducerConfigError(f"ToMe r must be >= 0, got {r}")
    if inflection:
        lo = int(r * (1.0 - inflection))
        hi = 2 * r - lo
        step = (hi - lo) / max(depth - 1, 1)
        return [int(lo + step * i) for i in range(depth)]
    return [round((i + 1) * r) - round(i * r) for i in range(depth)]


def mask_prefix_edges(scores: Tensor, num_prefix: int) -> Tensor:
    """``scores`` (B, A, B) of the edges from set A (even positions) to set B (odd positions),
    with every edge touching a prefix token set to −inf in place: the prefix tokens are A tokens
    ``0..ceil(p/2)-1`` and B tokens ``0..floor(p/2)-1``, and are never matched. ``fill_`` on
    the two slices, and none on an empty one: each block of every merging method runs this, and
    at batch 1 an operator costs its dispatch (an item assignment dispatches three)."""
    in_a, in_b = (num_prefix + 1) // 2, num_prefix // 2
    if in_a:
        scores[:, :in_a].fill_(-math.inf)
    if in_b:
        scores[:, :, :in_b].fill_(-math.inf)
    return scores


def bipartite_match(metric: Tensor, r: int, num_prefix: int) -> tuple[Tensor, Tensor, Tensor]:
    """ToMe's bipartite soft matching: tokens alternate into sets A (even) and B (odd), each A
    token's edge is its best cosine similarity to a B token, and the ``r`` strongest edges are
    matched. Returns ``(edge_idx, src_idx, dst_idx)``: every A token by decreasing edge
    (``edge_idx``, (B, ceil(N/2))), the matched A tokens (its first ``r``) and their B partners
    (indices into A and B). Prefix tokens are never matched."""
    metric = metric / torch.linalg.vector_norm(metric, dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = mask_prefix_edges(a @ b.transpose(-1, -2), num_prefix)
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    src_idx = edge_idx[:, :r]
    return edge_idx, src_idx, node_idx.gather(1, src_idx)


def bipartite_groups(metric: Tensor, r: int, num_prefix: int) -> tuple[Tensor, int]:
    """Assign every token to its output slot under ToMe's bipartite soft matching
    (:func:`bipartite_match`).

    Returns ``(group, num_out)``: ``group`` (B, N) maps each token to an output slot, merged
    A tokens share their B partner's slot, and slots ``0..num_prefix-1`` are the prefix tokens.
    """
    bsz, n, _ = metric.shape
    edge_idx, src_idx, dst_idx = bipartite_match(metric, r, num_prefix)
    na, nb = (n + 1) // 2, n // 2
    unm_idx = edge_idx[:, r:].sort(dim=-1).values
    n_unm = na - r
    slot_a = torch.empty(bsz, na, dtype=torch.long, device=metric.device)
    slot_a.scatter_(1, unm_idx, torch.arange(n_unm, device=metric.device).expand(bsz, -1))
    slot_a.scatter_(1, src_idx, n_unm + dst_idx)
    slot_b = (n_unm + torch.arange(nb, device=metric.device)).expand(bsz, -1)
    group = torch.empty(bsz, n, dtype=torch.long, device=metric.device)
    group[:, 0::2] = slot_a
    group[:, 1::2] = slot_b
    num_out = n - r
    remap = _prefix_first(num_prefix, n_unm, num_out, metric.device)
    return (group if remap is None else remap[group]), num_out


def _prefix_first(num_prefix: int, n_unm: int, num_out: int, device: torch.device) -> Tensor | None:
    """The slot permutation that moves the prefix slots to the front (None: already there).

    Prefix tokens are never merged, and where they land follows from the layout alone: the
    even ones (set A) have the lowest A indices, so they are the first unmerged A slots
    ``0..ceil(p/2)-1``; the odd ones (set B) keep their B slots ``n_unm + j``. Computing it from
    shapes, not from ``group``, keeps the step free of host-device syncs (on a GPU a data-
    dependent ``nonzero`` per block stalled the launch queue 24 times per forward).

    The counts are made plain ints first. They come from tensor shapes, and under
    ``torch.jit.trace`` (fvcore's FLOPs pass) a shape is a traced 0-dim tensor: the slot set
    below then compared tensors by identity, missed the set-B prefix slots, and built a
    permutation too long for every model with 2 or more prefix tokens (distilled DeiT,
    register tokens). In eager mode they already are ints, so ``int`` costs nothing and syncs
    nothing; it also keys the cache by value rather than by tensor identity. Under
    ``torch.compile`` the uncached function is traced (the graph holds the permutation as a
    constant), which is what dynamo would do with the cache anyway, minus its warning.
    """
    return _prefix_first_slots(int(num_prefix), int(n_unm), int(num_out), device)


@shape_constant(maxsize=64)
def _prefix_first_slots(num_prefix: int, n_unm: int, num_out: int, device: torch.device) -> Tensor | None:
    """:func:`_prefix_first` on plain ints, cached per layout and device."""
    if num_prefix < 2:
        return None
    prefix = [t // 2 if t % 2 == 0 else n_unm + t // 2 for t in range(num_prefix)]  # in token order
    taken = set(prefix)
    order = prefix + [s for s in range(num_out) if s not in taken]
    remap = torch.empty(num_out, dtype=torch.long)
    remap[torch.tensor(order)] = torch.arange(num_out)
    return remap.to(device)


def tome_merge(state: TokenState, r: int) -> TokenState:
    """One ToMe step on a state whose ``keys`` tap is set."""
    protected = state.num_prefix
    r = min(r, (state.num_tokens - protected) // 2)
    if r <= 0:
        return state
    metric = head_mean(state.keys)
    group, num_out = bipartite_groups(metric, r, state.num_prefix)
    return merge_all(state, group, num_out)


def half_caps(schedule: Iterable[tuple[int, int]], num_patches: int) -> list[tuple[int, int, int]]:
    """``(block, r asked, r possible)`` for each block of ``schedule`` (``(block, r)`` pairs in
    order) whose ``r`` exceeds half the non-prefix tokens entering it; later blocks see the
    counts the capped blocks leave. Bipartite matching (ToMe and the methods built on it) can
    merge or remove at most one token of each pair."""
    n, capped = num_patches, []
    for block, r in schedule:
        can = max(0, n // 2)
        if r > can:
            capped.append((block, r, can))
        n -= min(r, can)
    return capped


class ToMe(TokenReducer):
    """ToMe: merge ``r`` tokens in every block (or per the schedule).

    Args:
        r: tokens merged in every block (the budget knob; a fraction is spread over the blocks
            so the average is exact), or a list with one count per block (see :func:`tome_schedule`).
        inflection: ToMe's linear schedule, from ``r(1-inflection)`` to ``r(1+inflection)``
            across the blocks; 0 keeps ``r`` constant.
        prop_attn: proportional attention (``log(size)`` on the logits); should be off for
            MAE-style models fine-tuned without it.
    """

    budget_knob = "r"
    budget_range = (0.0, 60.0)

    def __init__(self, r: float | Sequence[int] = 13, inflection: float = 0.0, prop_attn: bool = True) -> None:
        if isinstance(r, Sequence) and not isinstance(r, str):
            r = [int(v) for v in r]
        super().__init__(r=r, inflection=inflection, prop_attn=prop_attn)
        tome_schedule(r, len(r) if isinstance(r, list) else 1, inflection)  # validate early
        self.schedule: list[int] = []

    def bind(self, info: ModelInfo) -> None:
        super().bind(info)
        self.schedule = tome_schedule(self.hparams["r"], info.depth, self.hparams["inflection"])

    def notes(self) -> list[str]:
        """Blocks where ``r`` exceeds what bipartite matching can merge (half the non-prefix
        tokens): ToMe caps the merges there, as the reference code does; say so."""
        if self.info is None:
            return []
        p = self.info.num_prefix
        capped = half_caps(enumerate(self.schedule), self.info.num_patches)
        if not capped:
            return []
        b, r, can = capped[0]
        return [
            f"r capped in {len(capped)} of {len(self.schedule)} blocks (first: block {b} merges {can} of the {r} "
            f"asked; a block can merge at most half its {'non-prefix ' if p else ''}tokens)"
        ]

    def reduces_at(self, block: int) -> bool:
        return block < len(self.schedule) and self.schedule[block] > 0

    def needs(self, block: int) -> frozenset[str]:
        return frozenset({KEYS})

    def reduce(self, state: TokenState, block: int) -> TokenState:
        return tome_merge(state, self.schedule[block])

    def token_counts(self, num_prefix: int, num_patches: int, depth: int) -> list[tuple[int, int]]:
        schedule = tome_schedule(self.hparams["r"], depth, self.hparams["inflection"])
        n = num_prefix + num_patches
        counts = []
        for r in schedule:
            out = n - max(0, min(r, (n - num_prefix) // 2))
            counts.append((n, out))
            n = out
        return counts

    def overhead_macs(self, block: int, n_tokens: int, dim: int, heads: int) -> int:
        """Similarity of A against B on head-averaged keys: ``ceil(N/2)·floor(N/2)·d``."""
        prefix = self.info.num_prefix if self.info else 1
        if block >= len(self.schedule) or min(self.schedule[block], (n_tokens - prefix) // 2) <= 0:
            return 0
        return math.ceil(n_tokens / 2) * (n_tokens // 2) * (dim // heads)
