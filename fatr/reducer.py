"""The FATR reducer: HF tokens kept, LF tokens folded into DC tokens, attention re-weighted.

Token layout after the first reduction: ``[prefix][DC slots][HF tokens]``. There is always one
DC slot per window of the current ``dc_grid`` so the batch stays rectangular; a window without
low-frequency tokens has a slot of size 0, which proportional attention masks out (``log 0``),
so it takes no part in any later computation — the same as having no DC token.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from fatr.dc import check_dc_grids, coarsen_windows, window_of
from fatr.scores import SCORES, hf_scores
from methods.base import ATTN, KeepRateReducer, ModelInfo, ReducerConfigError, TokenState, register
from methods.tokens import batch_gather, merge_groups, prefix_index

DC_SLOTS = "fatr_dc_slots"
DC_GRID = "fatr_dc_grid"


def fatr_reduce(state: TokenState, keep: int, score: str, dc_grid: int) -> TokenState:
    """One FATR step on a state whose ``attn`` tap is set. Batched; no loop over images."""
    p = state.num_prefix
    d_prev = state.extra.get(DC_SLOTS, 0)
    start = p + d_prev
    valid = state.size > 0
    scores = hf_scores(state.attn, score, valid)[:, start:]
    order = scores.argsort(dim=-1, descending=True) + start
    hf = order[:, :keep].sort(dim=-1).values
    lf = order[:, keep:]

    # Group every DC slot and LF token by its window; prefix and HF tokens stay out (-1).
    group = torch.full(state.size.shape, -1, dtype=torch.long, device=state.x.device)
    if d_prev:
        w_prev = state.extra[DC_GRID]
        group[:, p:start] = coarsen_windows(w_prev, dc_grid, group.device)
    group.scatter_(1, lf, window_of(batch_gather(state.pos, lf), state.patch_grid, dc_grid))
    dc_x, dc_size, dc_src = merge_groups(state, group, dc_grid * dc_grid)

    keep_idx = torch.cat([prefix_index(state), hf], dim=1)
    b = state.x.shape[0]
    dc_pos = torch.full((b, dc_grid * dc_grid), -1, dtype=state.pos.dtype, device=state.x.device)
    px, psz, ppos = (batch_gather(t, keep_idx) for t in (state.x, state.size, state.pos))
    x = torch.cat([px[:, :p], dc_x, px[:, p:]], dim=1)
    size = torch.cat([psz[:, :p], dc_size, psz[:, p:]], dim=1)
    pos = torch.cat([ppos[:, :p], dc_pos, ppos[:, p:]], dim=1)
    source = None
    if state.source is not None:
        ps = batch_gather(state.source, keep_idx)
        source = torch.cat([ps[:, :p], dc_src, ps[:, p:]], dim=1)
    extra = {**state.extra, DC_SLOTS: dc_grid * dc_grid, DC_GRID: dc_grid}
    return state.replace(x=x, size=size, pos=pos, source=source, grid=None, reduced=True, extra=extra)


@register("fatr")
class FATR(KeepRateReducer):
    """Frequency-aware token reduction.

    ω1 (per block and head) amplifies the high-frequency part of attention in every block
    after the first reduction; ω2 (per block) scales the attention paid to DC tokens. Both
    start at 0 (training-free: DC tokens then get plain proportional attention) and are
    ``nn.Parameter``s, so ``python -m fatr.calibrate`` or a user's training loop can fit them.
    """

    def __init__(
        self,
        blocks: Sequence[int] = (3, 6, 9),
        keep_rate: float | Sequence[float] = 0.7,
        score: str = "signed",
        dc_grid: int | Sequence[int] = 2,
        omega_path: str | None = None,
        prop_attn: bool = True,
    ) -> None:
        if score not in SCORES:
            raise ReducerConfigError(f"unknown FATR score {score!r}; choose one of {', '.join(SCORES)}")
        super().__init__(
            blocks=blocks, keep_rate=keep_rate, score=score, dc_grid=dc_grid, omega_path=omega_path, prop_attn=prop_attn
        )
        grids = [dc_grid] * len(self.blocks) if isinstance(dc_grid, int) else list(dc_grid)
        if len(grids) != len(self.blocks):
            raise ReducerConfigError(
                f"dc_grid has {len(grids)} values but there are {len(self.blocks)} reduction blocks"
            )
        check_dc_grids(grids)
        self.score = score
        self.dc_grids: dict[int, int] = dict(zip(self.blocks, grids, strict=True))
        self.omega_path = omega_path
        self.omega1 = nn.Parameter(torch.zeros(0, 0))
        self.omega2 = nn.Parameter(torch.zeros(0))
        self._omega_cache: tuple[tuple[int, int], bool] | None = None

    def bind(self, info: ModelInfo) -> None:
        super().bind(info)
        check_dc_grids(list(self.dc_grids.values()), info.patch_grid)
        if self.omega1.shape != (info.depth, info.num_heads):
            dev = self.omega1.device
            self.omega1 = nn.Parameter(torch.zeros(info.depth, info.num_heads, device=dev))
            self.omega2 = nn.Parameter(torch.zeros(info.depth, device=dev))
        if self.omega_path:
            self.load_omega(self.omega_path)

    # -- ω -----------------------------------------------------------------------------------
    def load_omega(self, path: str | Path) -> dict:
        """Load ω saved by ``python -m fatr.calibrate``; returns the file's metadata."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise ReducerConfigError(f"FATR omega file not found: {path} (make one with python -m fatr.calibrate)")
        saved = torch.load(str(path), map_location="cpu", weights_only=True)
        w1, w2 = saved["omega1"], saved["omega2"]
        if w1.shape != self.omega1.shape or w2.shape != self.omega2.shape:
            raise ReducerConfigError(
                f"omega file {path} is for {tuple(w1.shape)} (blocks, heads), this model needs "
                f"{tuple(self.omega1.shape)}"
            )
        with torch.no_grad():
            self.omega1.copy_(w1)
            self.omega2.copy_(w2)
        meta = dict(saved.get("meta", {}))
        mine = {
            "blocks": self.blocks,
            "keep_rate": self.hparams["keep_rate"],
            "score": self.score,
            "dc_grid": self.hparams["dc_grid"],
        }
        differ = [k for k in mine if k in meta and meta[k] != mine[k]]
        if differ:
            warnings.warn(
                f"omega file {path} was fitted with {', '.join(f'{k}={meta[k]}' for k in differ)}; "
                f"this FATR uses {', '.join(f'{k}={mine[k]}' for k in differ)}",
                stacklevel=2,
            )
        return meta

    def _omega_active(self) -> bool:
        """Whether ω is non-zero (or being trained), cached on the parameters' versions so
        inference with ω = 0 skips the re-weighting without a device sync per block."""
        if torch.is_grad_enabled() and (self.omega1.requires_grad or self.omega2.requires_grad):
            return True
        key = (self.omega1._version, self.omega2._version)
        if self._omega_cache is None or self._omega_cache[0] != key:
            active = bool(self.omega1.detach().any() or self.omega2.detach().any())
            self._omega_cache = (key, active)
        return self._omega_cache[1]

    def attention_gain(self, state: TokenState, block: int) -> Tensor | None:
        if DC_SLOTS not in state.extra or not self._omega_active():
            return None
        return self.omega1[block]

    def attention_bias(self, state: TokenState, block: int) -> Tensor | None:
        d = state.extra.get(DC_SLOTS, 0)
        if not d or not self._omega_active():
            return None
        p = state.num_prefix
        scale = (1 + self.omega2[block]).clamp_min(1e-3).log()
        col = torch.zeros(state.num_tokens, device=state.x.device, dtype=scale.dtype)
        col = col.index_put((torch.arange(p, p + d, device=col.device),), scale.expand(d))
        return col[None, None, None, :]

    # -- reduction -----------------------------------------------------------------------------
    def needs(self, block: int) -> frozenset[str]:
        return frozenset({ATTN})

    def reduce(self, state: TokenState, block: int) -> TokenState:
        patch = state.num_tokens - state.num_prefix - state.extra.get(DC_SLOTS, 0)
        return fatr_reduce(state, self.num_kept(block, patch), self.score, self.dc_grids[block])

    def count_step(self, block: int, special: int, patch: int) -> tuple[int, int]:
        return self.dc_grids[block] ** 2, self.num_kept(block, patch)
