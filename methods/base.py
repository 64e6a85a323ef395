"""The one interface every token reducer implements, and the state it transforms.

A reducer runs inside chosen transformer blocks between the attention residual and the MLP,
so the MLP and every later block see fewer tokens. It never touches the model itself: the
single ViT patch in :mod:`methods.patch` calls it with a :class:`TokenState` and uses what it
returns. Keeping the model surgery in one place is what makes the comparison fair: every
method pays exactly the same overhead for the same work.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

ATTN = "attn"
"""Need: the block's full attention probabilities ``(B, H, N, N)`` (forces the explicit path)."""
CLS_ATTN = "cls_attn"
"""Need: only the first prefix token's attention row ``(B, H, N)``; the block stays fused."""
KEYS = "keys"
"""Need: the block's keys ``(B, H, N, head_dim)``; the block stays fused."""
VALUES = "values"
"""Need: the block's values ``(B, H, N, head_dim)`` (ATS's and PPT's ``‖v‖``); the block stays fused."""
NEEDS = frozenset({ATTN, CLS_ATTN, KEYS, VALUES})


@dataclass(frozen=True)
class AttentionReweight:
    """Post-softmax re-weighting of one block's attention, computed by :mod:`methods.attention`
    (whose docstring gives the equations); part of the interface, so it lives here.

    Args:
        hp_gain: per-head gain ``(H,)`` on the high-pass part of the ordinary columns (ω1).
        span: ``[start, stop)`` of the columns treated apart (e.g. DC tokens); empty = none.
        span_gain: per-head gain ``(H,)`` on the span's attention (ω2); None = 0.
    """

    hp_gain: Tensor
    span: tuple[int, int] = (0, 0)
    span_gain: Tensor | None = None

    @property
    def span_size(self) -> int:
        return max(0, self.span[1] - self.span[0])


class ReducerConfigError(ValueError):
    """A reducer was configured with values that cannot work (raised before any forward pass)."""


@dataclass(frozen=True)
class ModelInfo:
    """What a reducer may know about the model it is bound to."""

    depth: int
    num_heads: int
    embed_dim: int
    num_prefix: int
    patch_grid: tuple[int, int]

    @property
    def num_patches(self) -> int:
        return self.patch_grid[0] * self.patch_grid[1]


@dataclass
class TokenState:
    """Tokens between blocks plus the bookkeeping that reducers need to stay correct.

    Prefix tokens (cls, dist, registers) are always the first ``num_prefix`` tokens and are
    never merged or dropped, so timm heads that read ``x[:, 0]`` keep working.
    """

    x: Tensor
    """Tokens ``(B, N, C)``."""
    size: Tensor
    """How many original patches each token stands for ``(B, N)``; prefix tokens count 1.
    A size of 0 marks an empty slot, which proportional attention masks out."""
    pos: Tensor
    """Original patch index of each token ``(B, N)``; -1 for prefix and merged tokens."""
    num_prefix: int
    patch_grid: tuple[int, int]
    """Patch grid of the input image (rows, cols): where ``pos`` indices live."""
    grid: tuple[int, int] | None
    """Current layout of the patch tokens when they still form a full grid, else None."""
    source: Tensor | None = None
    """Optional source map ``(B, N, P)``: which original patches each token covers."""
    attn: Tensor | None = None
    """This block's attention probabilities, only when the reducer asked for them."""
    cls_attn: Tensor | None = None
    """This block's first-prefix-token attention row ``(B, H, N)``, only when asked for."""
    keys: Tensor | None = None
    """This block's keys ``(B, H, N, head_dim)``, only when asked for."""
    values: Tensor | None = None
    """This block's values ``(B, H, N, head_dim)``, only when asked for."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Reducer-private bookkeeping carried across blocks (e.g. FATR's DC slots)."""
    reduced: bool = False
    """True once any token was merged or dropped (turns proportional attention on)."""
    may_have_empty: bool = False
    """True once a reducer may have left empty (size-0) slots: a per-image token count kept in
    static shapes (ATS). Decided from shapes, never from values (that would be a host sync).
    Every later block then masks size-0 slots out of attention, with or without proportional
    attention; pooling already ignores them."""

    @property
    def num_tokens(self) -> int:
        return self.x.shape[1]

    def replace(self, **changes: Any) -> TokenState:
        """``dataclasses.replace``, in a third of its time (0.7 µs, not 2.5): it goes through
        ``__init__``, and a reducer replaces the state a few times per block, which at batch 1
        on a CPU adds up to a share of a percent. Same result: the fields are copied, the
        changed ones replaced, an unknown name is a TypeError. Traced as
        ``dataclasses.replace`` under ``torch.compile``."""
        if torch.compiler.is_compiling():
            return dataclasses.replace(self, **changes)
        unknown = changes.keys() - _field_names(type(self))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {sorted(unknown)}")
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        return new


@functools.cache
def _field_names(cls: type) -> frozenset[str]:
    """The dataclass fields of ``cls`` (a subclass of :class:`TokenState` may add some)."""
    return frozenset(f.name for f in dataclasses.fields(cls))


class TokenReducer(nn.Module):
    """Base class of every method. Subclass it and implement :meth:`reduce`; the harness builds
    it from a Hydra method config (``reducer._target_``, see ``bench/conf/method/``).

    A subclass passes its constructor arguments to ``super().__init__(**hparams)`` so that
    runs can be recorded, hashed and rebuilt with a different budget knob.

    Args:
        **hparams: every constructor argument of the subclass, by name (recorded with each run);
            ``prop_attn`` (default True) turns proportional attention on once tokens were merged.
    """

    budget_knob: ClassVar[str | None] = None
    """Name of the constructor argument that budget matching solves for (None: not tunable)."""
    budget_range: ClassVar[tuple[float, float]] = (0.0, 1.0)
    """Range of the budget knob searched by bisection."""
    budget_knob_integer: ClassVar[bool] = False

    def __init__(self, **hparams: Any) -> None:
        super().__init__()
        self.hparams: dict[str, Any] = hparams
        self.proportional_attention: bool = bool(hparams.get("prop_attn", True))
        self.info: ModelInfo | None = None

    # -- binding ---------------------------------------------------------------------------
    def bind(self, info: ModelInfo) -> None:
        """Check the configuration against the model; raise :class:`ReducerConfigError`."""
        self.info = info

    def prepare(self, device: torch.device) -> None:
        """Build, on ``device``, what the forward reads but nothing learns (random pruning's
        kept-index tables). :func:`methods.apply_reducer` calls it after :meth:`bind`, once the
        reducer will run; :meth:`bind` alone (budget matching, analytic counts) stays cheap. Host
        work done here is work a forward does not do: no device sync, one compiled graph."""

    def notes(self) -> list[str]:
        """One line for each way the bound reducer departs from its configuration on this model
        (ToMe: an ``r`` larger than a block can merge is capped), to be shown with its numbers."""
        return []

    def with_knob(self, value: float) -> TokenReducer:
        """A fresh reducer of the same kind with the budget knob set to ``value``."""
        if self.budget_knob is None:
            raise ReducerConfigError(f"{type(self).__name__} has no budget knob to tune")
        return type(self)(**{**self.hparams, self.budget_knob: value})

    # -- what the patch asks -----------------------------------------------------------------
    def reduces_at(self, block: int) -> bool:
        """Whether :meth:`reduce` runs in this block."""
        return False

    def needs(self, block: int) -> frozenset[str]:
        """Which of ``ATTN``, ``CLS_ATTN``, ``KEYS``, ``VALUES`` the reducer reads in this block."""
        return frozenset()

    def reduce(self, state: TokenState, block: int) -> TokenState:
        """Return the reduced state. Must keep the prefix tokens first and untouched."""
        return state

    def attention_bias(self, state: TokenState, block: int) -> Tensor | None:
        """Additive logit bias ``(B, 1, 1, N)`` on top of proportional attention, or None."""
        return None

    def attention_reweight(self, state: TokenState, block: int) -> AttentionReweight | None:
        """Post-softmax re-weighting of this block's attention (FATR's ω), or None.

        See :mod:`methods.attention`: a gain on the high-pass part of attention and a gain on
        a span of columns; the block stays on the fused kernel where it needs no map.
        """
        return None

    # -- cost model -------------------------------------------------------------------------
    def token_counts(self, num_prefix: int, num_patches: int, depth: int) -> list[tuple[int, int]]:
        """Token count entering each block and leaving its reduction, ``[(n_in, n_out)]``.

        Used by the analytic MACs count and budget matching, and checked against real
        forwards in the tests, so it must agree exactly with :meth:`reduce`.
        """
        n = num_prefix + num_patches
        return [(n, n)] * depth

    def overhead_macs(self, block: int, n_tokens: int, dim: int, heads: int) -> int:
        """Multiply-accumulates the reducer itself spends in ``block`` (matmuls only)."""
        return 0

    def overhead_macs_per_block(self, num_prefix: int, num_patches: int, depth: int, dim: int, heads: int) -> list[int]:
        """:meth:`overhead_macs` of every block for an input of ``num_patches`` patches, as the
        analytic MACs count asks for them. Override this one instead when a step's cost depends
        on more than its block and its input count (DCT's on the length it resamples to)."""
        counts = self.token_counts(num_prefix, num_patches, depth)
        return [self.overhead_macs(block, n_in, dim, heads) for block, (n_in, _) in enumerate(counts)]


def check_block_indices(blocks: Sequence[int], depth: int, what: str = "reduction block") -> None:
    """Reject block indices the model does not have, naming the valid range."""
    for b in blocks:
        if not isinstance(b, int) or isinstance(b, bool):
            raise ReducerConfigError(f"{what} index {b!r} is not an integer")
        if not 0 <= b < depth:
            raise ReducerConfigError(f"{what} index {b} is outside the model's depth: valid blocks are 0..{depth - 1}")


def check_keep_rate(keep: float) -> float:
    if not isinstance(keep, (int, float)) or isinstance(keep, bool) or not 0.0 < keep <= 1.0:
        raise ReducerConfigError(f"keep_rate must be in (0, 1], got {keep!r}")
    return float(keep)


class KeepRateReducer(TokenReducer):
    """Shared schedule for methods that reduce at a few blocks to a fraction of the tokens.

    EViT, FATR, pooling, clustering and pruning all take the same two knobs, ``blocks`` and
    ``keep_rate``, so they can be compared at identical token counts. Subclasses refine
    :meth:`count_step` when they add tokens of their own (EViT's fused token, FATR's DC tokens).

    Args:
        blocks: indices of the blocks that reduce (0-based, strictly increasing).
        keep_rate: fraction of the patch tokens kept at each of them, ``ceil(keep_rate * N)``;
            one number for every block or one per block (the budget knob).
        **hparams: the subclass's own arguments, recorded with these two.
    """

    budget_knob = "keep_rate"
    budget_range = (0.02, 1.0)

    def __init__(
        self,
        blocks: Sequence[int] = (3, 6, 9),
        keep_rate: float | Sequence[float] = 0.7,
        **hparams: Any,
    ) -> None:
        if isinstance(blocks, int):
            blocks = [blocks]
        for b in blocks:
            if not isinstance(b, int) or isinstance(b, bool) or b < 0:
                raise ReducerConfigError(f"reduction block index {b!r} must be a non-negative integer")
        if list(blocks) != sorted(set(blocks)):
            raise ReducerConfigError(f"blocks must be strictly increasing, got {list(blocks)}")
        super().__init__(blocks=list(blocks), keep_rate=keep_rate, **hparams)
        if isinstance(keep_rate, (int, float)):  # a bool is refused by check_keep_rate
            keeps = [check_keep_rate(keep_rate)] * len(blocks)
        else:
            keeps = [check_keep_rate(k) for k in keep_rate]
            if len(keeps) != len(blocks):
                raise ReducerConfigError(
                    f"keep_rate has {len(keeps)} values but there are {len(blocks)} reduction blocks"
                )
        self.blocks: list[int] = list(blocks)
        self.keep: dict[int, float] = dict(zip(blocks, keeps, strict=True))

    def bind(self, info: ModelInfo) -> None:
        check_block_indices(self.blocks, info.depth)
        super().bind(info)

    def reduces_at(self, block: int) -> bool:
        return block in self.keep

    def num_kept(self, block: int, n: int) -> int:
        """Tokens kept of ``n`` candidates: ``ceil(keep * n)``, at least 1."""
        return max(1, min(n, math.ceil(self.keep[block] * n - 1e-9)))

    def count_step(self, block: int, special: int, patch: int) -> tuple[int, int]:
        """(special, patch) token counts after this block's reduction."""
        return special, self.num_kept(block, patch)

    def token_counts(self, num_prefix: int, num_patches: int, depth: int) -> list[tuple[int, int]]:
        special, patch = 0, num_patches
        counts = []
        for b in range(depth):
            n_in = num_prefix + special + patch
            if self.reduces_at(b):
                special, patch = self.count_step(b, special, patch)
            counts.append((n_in, num_prefix + special + patch))
        return counts
