"""The FATR reducer: HF tokens kept, LF tokens folded into DC tokens, attention re-weighted.

Token layout after the first reduction: ``[prefix][DC slots][HF tokens]``. There is always one
DC slot per window of the current ``dc_grid`` so the batch stays rectangular; a window without
low-frequency tokens has a slot of size 0, which the attention bias masks out (``log 0``), so
it takes no part in any later computation — the same as having no DC token.

Where the paper (arXiv 2511.21477) leaves a choice open, this module picks as follows:

- Scores use every valid query (prefix, DC and HF tokens) and rank only the HF candidates; DC
  slots are never candidates (paper, Eqs. 7-9, read literally).
- Eq. 11 at a later reduction: each existing DC token joins the new DC token of the (coarser)
  window that contains it, as one more member of the window's mean, weighted by its size.
- ω (Eq. 12) is re-weighted after the softmax with the DC columns taken out of the low/high
  split (:mod:`methods.attention`), so ω1 = ω2 = 0 is exactly the unweighted model.
- The DC positional term (appendix D) is one learnable vector per DC slot and reduction
  block, added when the DC token is (re)built.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from fatr.dc import check_dc_grids, coarsen_windows, window_of
from fatr.scores import SCORES, hf_scores
from methods.base import ATTN, AttentionReweight, KeepRateReducer, ModelInfo, ReducerConfigError, TokenState
from methods.tokens import batch_gather, empty_slot_bias, merge_groups, prefix_index

DC_SLOTS = "fatr_dc_slots"
DC_GRID = "fatr_dc_grid"
DC_EMPTY = "fatr_dc_empty"
"""Whether a DC slot may be empty, decided from shapes alone (:func:`dc_may_be_empty`): later
blocks then mask size-0 slots out of attention (a zero bias where none is empty)."""

OMEGA2_FORMS = ("post_softmax", "logit")
DC_WEIGHTS = ("mean", "attn")


def attention_received(attn: Tensor, valid: Tensor) -> Tensor:
    """Mean attention each token receives from the valid queries, heads averaged ``(B, N)``."""
    q_w = valid.float()[:, None, :]  # (B, 1, N)
    return (q_w @ attn.float().mean(dim=1))[:, 0] / q_w.sum(-1)


def dc_may_be_empty(dc_grid: int, num_lf: int, prev_may_be_empty: bool | None) -> bool:
    """Whether a DC slot built by a reduction can be empty, known from shapes alone.

    Deciding it per batch from the sizes would read a tensor on the host (a device sync, and a
    graph break under ``torch.compile``), so the mask is applied whenever a slot *can* be
    empty; where none is, the mask is a zero bias and every number stays the same. A slot is
    certainly filled when its window receives a low-frequency token (the one global window
    does whenever ``num_lf > 0``) or holds an earlier DC slot that was certainly filled (every
    window of a coarser grid contains at least one window of the finer one).

    Args:
        dc_grid: ``w`` of this reduction's ``w x w`` DC windows.
        num_lf: low-frequency tokens folded into DC slots at this reduction (per image).
        prev_may_be_empty: the same answer for the previous DC slots; None if there are none.
    """
    if prev_may_be_empty is False:
        return False
    return not (dc_grid == 1 and num_lf > 0)


def _refresh_after_load(module: nn.Module, incompatible_keys: object) -> None:
    """``load_state_dict`` post-hook: loaded ω decide the forward's path (:meth:`FATR.refresh_learned`)."""
    module.refresh_learned()


def fatr_reduce(
    state: TokenState,
    keep: int,
    score: str,
    dc_grid: int,
    dc_weight: str = "mean",
    svd_rank: int = 4,
    svd_iters: int | None = 2,
) -> TokenState:
    """One FATR step on a state whose ``attn`` tap is set. Batched; no loop over images.

    ``dc_weight="mean"`` makes each DC token the size-weighted mean of its members (paper);
    ``"attn"`` weights every member by its size times the attention it receives (the seed's
    attention-weighted aggregation). A DC token's size is the number of patches it covers
    either way.
    """
    p = state.num_prefix
    d_prev = state.extra.get(DC_SLOTS, 0)
    start = p + d_prev
    valid = state.size > 0
    scores = hf_scores(state.attn, score, valid, svd_rank, svd_iters)[:, start:]
    order = scores.argsort(dim=-1, descending=True) + start
    hf = order[:, :keep].sort(dim=-1).values
    lf = order[:, keep:]

    # Group every DC slot and LF token by its window; prefix and HF tokens stay out (-1).
    group = torch.full(state.size.shape, -1, dtype=torch.long, device=state.x.device)
    if d_prev:
        w_prev = state.extra[DC_GRID]
        group[:, p:start] = coarsen_windows(w_prev, dc_grid, group.device)
    group.scatter_(1, lf, window_of(batch_gather(state.pos, lf), state.patch_grid, dc_grid))
    weight = None
    if dc_weight == "attn":
        weight = state.size * attention_received(state.attn, valid).clamp_min(1e-12)
    dc_x, dc_size, dc_src = merge_groups(state, group, dc_grid * dc_grid, weight)

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


def _setting(value: object) -> str:
    """A setting as a note shows it: floats to four decimals (a solved ``keep_rate``)."""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


class FATR(KeepRateReducer):
    """Frequency-aware token reduction (Lee et al., NeurIPS 2025).

    Args:
        blocks: blocks (0-based) after whose attention the tokens are reduced; the paper's
            layers 4, 7, 10 are blocks 3, 6, 9.
        keep_rate: fraction of the remaining HF candidates kept at each reduction (one value,
            or one per block); 0.7 removes 30% as in the paper.
        score: how a token's high-frequency contribution is measured: ``signed`` (the paper's
            column mean of ``A_HP``), ``abs``, ``std``, or ``svd`` (the seed's leverage on the
            top singular directions of ``A_HP``; see :mod:`fatr.scores`).
        dc_grid: DC windows ``w`` per reduction block (``w x w`` local DC tokens; 1 = one global
            DC token); one int for every block, or one per block. Later grids must divide
            earlier ones. The paper uses ``[2, 1, 1]`` for DeiT-T/B and ``[2, 2, 1]`` for ViT-S.
        omega_path: file with fitted ω (and DC positional terms) to load; None = ω = 0.
        prop_attn: proportional attention (``log size`` on the logits) after the first
            reduction. The paper has none (ω2 compensates DC tokens); True was this project's
            earlier default.
        omega2_form: ``post_softmax`` (paper: ``(1+ω2)·A`` on the DC columns, rows not
            renormalised) or ``logit`` (a ``log(1+ω2)`` logit bias, renormalised by the softmax;
            the earlier form here).
        dc_weight: ``mean`` (size-weighted mean, paper) or ``attn`` (weights also scaled by the
            attention each token receives, the seed's reading).
        svd_rank: rank ``r`` of the subspace the ``svd`` score projects on.
        svd_iters: subspace-iteration steps of the ``svd`` score; None = exact SVD.

    ω1 and ω2 ``(depth, heads)`` and the DC positional term ``dc_pos[str(block)]``
    ``(w², dim)`` are ``nn.Parameter``s, zero at start (training-free: the model is then
    exactly the reduced model without re-weighting), so fine-tuning can train them.
    """

    def __init__(
        self,
        blocks: Sequence[int] = (3, 6, 9),
        keep_rate: float | Sequence[float] = 0.7,
        score: str = "signed",
        dc_grid: int | Sequence[int] = (2, 1, 1),
        omega_path: str | None = None,
        prop_attn: bool = False,
        omega2_form: str = "post_softmax",
        dc_weight: str = "mean",
        svd_rank: int = 4,
        svd_iters: int | None = 2,
    ) -> None:
        if score not in SCORES:
            raise ReducerConfigError(f"unknown FATR score {score!r}; choose one of {', '.join(SCORES)}")
        if omega2_form not in OMEGA2_FORMS:
            raise ReducerConfigError(f"unknown omega2_form {omega2_form!r}; choose one of {', '.join(OMEGA2_FORMS)}")
        if dc_weight not in DC_WEIGHTS:
            raise ReducerConfigError(f"unknown dc_weight {dc_weight!r}; choose one of {', '.join(DC_WEIGHTS)}")
        if not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank < 1:
            raise ReducerConfigError(f"svd_rank must be a positive integer, got {svd_rank!r}")
        if svd_iters is not None and (not isinstance(svd_iters, int) or isinstance(svd_iters, bool) or svd_iters < 0):
            raise ReducerConfigError(f"svd_iters must be a non-negative integer or null (exact SVD), got {svd_iters!r}")
        if isinstance(dc_grid, tuple):
            dc_grid = list(dc_grid)
        super().__init__(
            blocks=blocks,
            keep_rate=keep_rate,
            score=score,
            dc_grid=dc_grid,
            omega_path=omega_path,
            prop_attn=prop_attn,
            omega2_form=omega2_form,
            dc_weight=dc_weight,
            svd_rank=svd_rank,
            svd_iters=svd_iters,
        )
        grids = [dc_grid] * len(self.blocks) if isinstance(dc_grid, int) else list(dc_grid)
        if len(grids) != len(self.blocks):
            raise ReducerConfigError(
                f"dc_grid has {len(grids)} values but there are {len(self.blocks)} reduction blocks "
                f"{self.blocks}: give one window size per block (e.g. dc_grid=[2{', 1' * (len(self.blocks) - 1)}])"
            )
        check_dc_grids(grids)
        self.score = score
        self.dc_grids: dict[int, int] = dict(zip(self.blocks, grids, strict=True))
        self.omega_path = omega_path
        self.omega2_form = omega2_form
        self.dc_weight = dc_weight
        self.svd_rank = svd_rank
        self.svd_iters = svd_iters
        self.omega1 = nn.Parameter(torch.zeros(0, 0))
        self.omega2 = nn.Parameter(torch.zeros(0, 0))
        self.dc_pos = nn.ParameterDict()
        self._learned = False
        self._learned_key: tuple[int, ...] = ()
        self._omega_mismatch: str | None = None
        self.refresh_learned()
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def bind(self, info: ModelInfo) -> None:
        super().bind(info)
        check_dc_grids(list(self.dc_grids.values()), info.patch_grid)
        dev = self.omega1.device
        if self.omega1.shape != (info.depth, info.num_heads):
            self.omega1 = nn.Parameter(torch.zeros(info.depth, info.num_heads, device=dev))
            self.omega2 = nn.Parameter(torch.zeros(info.depth, info.num_heads, device=dev))
        shapes = {str(b): (w * w, info.embed_dim) for b, w in self.dc_grids.items()}
        if {k: tuple(v.shape) for k, v in self.dc_pos.items()} != shapes:
            self.dc_pos = nn.ParameterDict({k: nn.Parameter(torch.zeros(*s, device=dev)) for k, s in shapes.items()})
        if self.omega_path:
            self.load_omega(self.omega_path)
        self.refresh_learned()

    # -- ω and the DC positional term ----------------------------------------------------------
    def load_omega(self, path: str | Path) -> dict:
        """Load ω (and DC positional terms, if saved) from a file; returns its metadata.

        Reads a reducer ``state_dict`` or the older ``{"omega1", "omega2", "meta"}`` files,
        whose per-block ω2 ``(depth,)`` is broadcast to every head. Settings the file was fitted
        with that differ from this FATR's are a warning and one of :meth:`notes`, which the
        harness prints and records with the run instead.
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise ReducerConfigError(f"FATR omega file not found: {path} (fit one with python -m bench.finetune)")
        try:
            saved = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line error
            raise ReducerConfigError(f"FATR omega file {path} cannot be read: {type(e).__name__}: {e}") from None
        if not isinstance(saved, dict) or "omega1" not in saved or "omega2" not in saved:
            raise ReducerConfigError(f"FATR omega file {path} holds no omega1/omega2 tensors")
        w1, w2 = saved["omega1"], saved["omega2"]
        if w2.dim() == 1 and w2.shape[0] == self.omega2.shape[0]:
            w2 = w2[:, None].expand(-1, self.omega2.shape[1])
        if w1.shape != self.omega1.shape or w2.shape != self.omega2.shape:
            raise ReducerConfigError(
                f"omega file {path} is for {tuple(w1.shape)} (blocks, heads), this model needs "
                f"{tuple(self.omega1.shape)}"
            )
        pos = {k.removeprefix("dc_pos."): v for k, v in saved.items() if k.startswith("dc_pos.")}
        with torch.no_grad():
            self.omega1.copy_(w1)
            self.omega2.copy_(w2)
            for key, value in pos.items():
                if key not in self.dc_pos or self.dc_pos[key].shape != value.shape:
                    raise ReducerConfigError(
                        f"omega file {path} has a DC positional term for block {key} of shape "
                        f"{tuple(value.shape)}, which this FATR's dc_grid does not have"
                    )
                self.dc_pos[key].copy_(value)
        self.refresh_learned()
        meta = dict(saved.get("meta", {}))
        mine = {
            "blocks": self.blocks,
            "keep_rate": self.hparams["keep_rate"],
            "score": self.score,
            "dc_grid": self.hparams["dc_grid"],
        }
        differ = [k for k in mine if k in meta and meta[k] != mine[k]]
        self._omega_mismatch = None
        if differ:
            self._omega_mismatch = (
                f"omega file {path} was fitted with {', '.join(f'{k}={_setting(meta[k])}' for k in differ)}; "
                f"this FATR uses {', '.join(f'{k}={_setting(mine[k])}' for k in differ)}"
            )
            warnings.warn(self._omega_mismatch, stacklevel=2)
        return meta

    def notes(self) -> list[str]:
        """The ω file's fitting settings where they differ from this FATR's (a budget solved to
        a slightly other ``keep_rate`` than the one ω was fitted at, say)."""
        return [*super().notes(), *([self._omega_mismatch] if self._omega_mismatch else [])]

    def _learned_params(self) -> list[nn.Parameter]:
        return [self.omega1, self.omega2, *self.dc_pos.values()]

    def _learned_version(self) -> tuple[int, ...]:
        params = self._learned_params()
        return tuple(p._version for p in params) + tuple(id(p) for p in params)

    def refresh_learned(self) -> bool:
        """Decide on the host whether ω or a DC positional term is non-zero; returns it.

        Reading parameters on the host is a device sync, so it is done here, where they change
        outside an optimiser step: :meth:`bind`, :meth:`load_omega`, ``load_state_dict``,
        ``.to()`` and ``train()``/``eval()``. The forward reads the stored bool, so it has no
        sync and ``torch.compile`` captures it as one graph (guarded on that bool). After
        editing ω in place under ``torch.compile``, call this (or ``eval()``); eager forwards
        notice such edits themselves (:meth:`_learned_nonzero`).
        """
        params = self._learned_params()
        # on the meta device (a weightless model, patched to check a run's settings) nothing has a value
        self._learned = any(bool(p.detach().any()) for p in params if p.numel() and not p.is_meta)
        self._learned_key = self._learned_version()
        return self._learned

    def _learned_nonzero(self) -> bool:
        """Whether ω or a DC positional term is non-zero (:meth:`refresh_learned`'s answer).

        Eager forwards also compare the parameters' versions (host integers, no sync) and
        refresh after an in-place edit that bypassed the refresh points (one sync, the first
        forward after the edit); compiled forwards read the bool alone.
        """
        if not torch.compiler.is_compiling() and self._learned_key != self._learned_version():
            self.refresh_learned()
        return self._learned

    def _learned_active(self) -> bool:
        """Whether the forward must apply ω and the DC positional term: non-zero, or being
        trained (gradients must reach them even while they are still zero)."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self._learned_params()):
            return True
        return self._learned_nonzero()

    def train(self, mode: bool = True) -> FATR:
        """Switch mode and refresh :meth:`refresh_learned` (an optimiser may have changed ω)."""
        super().train(mode)
        self.refresh_learned()
        return self

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> FATR:
        """``.to()``, ``.cuda()``, ``.half()``: a conversion may replace the parameters."""
        out = super()._apply(fn, recurse)
        self.refresh_learned()
        return out

    def attention_reweight(self, state: TokenState, block: int) -> AttentionReweight | None:
        if DC_SLOTS not in state.extra or not self._learned_active():
            return None
        if self.omega2_form == "logit":
            return AttentionReweight(hp_gain=self.omega1[block])
        p, d = state.num_prefix, state.extra[DC_SLOTS]
        return AttentionReweight(hp_gain=self.omega1[block], span=(p, p + d), span_gain=self.omega2[block])

    def attention_bias(self, state: TokenState, block: int) -> Tensor | None:
        d = state.extra.get(DC_SLOTS, 0)
        if not d:
            return None
        bias = None
        if not self.proportional_attention and state.extra.get(DC_EMPTY, True):
            bias = empty_slot_bias(state.size)
        if self.omega2_form == "logit" and self._learned_active():
            p = state.num_prefix
            scale = (1 + self.omega2[block]).clamp_min(1e-3).log()  # (H,)
            col = torch.zeros(scale.shape[0], state.num_tokens, device=state.x.device, dtype=scale.dtype)
            col = torch.cat([col[:, :p], scale[:, None].expand(-1, d), col[:, p + d :]], dim=1)
            bias = col[None, :, None, :] if bias is None else bias + col[None, :, None, :]
        return bias

    # -- reduction -----------------------------------------------------------------------------
    def needs(self, block: int) -> frozenset[str]:
        return frozenset({ATTN})

    def reduce(self, state: TokenState, block: int) -> TokenState:
        d_prev = state.extra.get(DC_SLOTS, 0)
        patch = state.num_tokens - state.num_prefix - d_prev
        keep = self.num_kept(block, patch)
        new = fatr_reduce(
            state,
            keep,
            self.score,
            self.dc_grids[block],
            self.dc_weight,
            self.svd_rank,
            self.svd_iters,
        )
        p, d = new.num_prefix, new.extra[DC_SLOTS]
        if self._learned_active():
            pos = self.dc_pos[str(block)].to(new.x.dtype)
            x = torch.cat([new.x[:, :p], new.x[:, p : p + d] + pos, new.x[:, p + d :]], dim=1)
            new = new.replace(x=x)
        prev = state.extra.get(DC_EMPTY, True) if d_prev else None
        empty = dc_may_be_empty(self.dc_grids[block], patch - keep, prev)
        return new.replace(extra={**new.extra, DC_EMPTY: empty})

    def count_step(self, block: int, special: int, patch: int) -> tuple[int, int]:
        return self.dc_grids[block] ** 2, self.num_kept(block, patch)

    def overhead_macs(self, block: int, n_tokens: int, dim: int, heads: int) -> int:
        """Matmul MACs FATR adds: its scores at a reduction block, the re-weighting elsewhere.

        Scores: ``H·N²`` for the query-weighted column sums; ``svd`` power iteration
        ``N²·r·(2 + 2·iters)`` on the head-averaged map (exact ``torch.linalg.svd`` is no
        matmul and is not counted, like every other non-matmul op here). Re-weighting with
        trained ω after the first reduction: the padded one-hot channels of the fused kernel
        and the DC-column product.
        """
        macs = 0
        if self.reduces_at(block):
            macs += heads * n_tokens * n_tokens
            if self.score == "svd" and self.svd_iters is not None:
                macs += n_tokens * n_tokens * self.svd_rank * (2 + 2 * self.svd_iters)
        first = min(self.blocks) if self.blocks else None
        if first is not None and block > first and self._learned_nonzero() and self.omega2_form == "post_softmax":
            previous = max(b for b in self.blocks if b < block)
            d = self.dc_grids[previous] ** 2
            pad = -(-d // 8) * 8
            head_dim = dim // heads
            macs += heads * (2 * n_tokens * n_tokens * pad + n_tokens * d * head_dim + n_tokens * head_dim)
        return macs
