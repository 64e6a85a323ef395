"""Spectral frequency bias: which token-space and spatial frequencies each reducer keeps.

For a fixed set of real images, after every block, the reduced model's tokens are compared
with the unreduced model's tokens at the same block: high-frequency energy ratio, effective
and stable rank, Dong et al.'s rank-collapse residual, and the radial power spectrum of the
tokens painted back onto the patch grid. At each reduction block we also score, with FATR's
``std`` score on that block's attention, the tokens the method removed or merged against the
ones it kept as they were.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from bench import spectral_metrics as sm
from bench.finite import check_finite_output
from methods import ATTN, TokenReducer, apply_reducer, reduction_context, remove_reducer
from methods.identity import NoReduction


def _mean(t: Tensor) -> float:
    t = t.double()
    t = t[~torch.isnan(t)]
    return float(t.mean()) if t.numel() else float("nan")


class BlockRecorder:
    """Collects per-block token statistics of one patched model during a forward pass."""

    def __init__(self, model: nn.Module, num_bands: int) -> None:
        self.model = model
        self.num_bands = num_bands
        self.per_block: list[dict[str, Any]] = []
        self.spectra: list[Tensor] = []
        self.removal: dict[int, dict[str, float]] = {}
        self.ctx = reduction_context(model)
        self.ctx.observers.append(self._on_reduction)
        self.ctx.extra_needs = frozenset({ATTN})
        self.hooks = [blk.register_forward_hook(self._on_block) for blk in model.blocks]

    def _on_block(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        st = reduction_context(self.model).state
        x, size, p = st.x.float(), st.size, st.num_prefix
        res = sm.rank_collapse_residual(x, size, p)
        self.per_block.append(
            {
                "tokens": int(x.shape[1]),
                "hf_energy": _mean(sm.hf_energy_ratio(x, size, p)),
                "effective_rank": _mean(sm.effective_rank(x, size, p)),
                "stable_rank": _mean(sm.stable_rank(x, size, p)),
                "residual_fro": _mean(res["fro"]),
                "residual_l1inf": _mean(res["l1inf"]),
            }
        )
        grid = sm.scatter_to_grid(x, st.source, p, st.patch_grid)
        self.spectra.append(sm.radial_power_spectrum(grid, self.num_bands))

    def _on_reduction(self, block: int, before, after) -> None:
        if before.attn is None:
            return
        kept = sm.untouched_mask(before, after)
        scores = sm.removed_vs_kept_score(before.attn, kept, before.num_prefix, valid=before.size > 0)
        self.removal[block] = {k: _mean(v) for k, v in scores.items()}

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.ctx.observers.remove(self._on_reduction)
        self.ctx.extra_needs = frozenset()


def block_statistics(
    model: nn.Module, reducer: TokenReducer, images: Tensor, num_bands: int, batch_size: int = 16
) -> tuple[list[dict[str, Any]], Tensor, dict[int, dict[str, float]]]:
    """Per-block statistics (mean over images), per-block band power (depth, bands), removal scores."""
    work = copy.deepcopy(model)
    remove_reducer(work)
    apply_reducer(work, reducer, trace_source=True)
    chunks = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            rec = BlockRecorder(work, num_bands)
            check_finite_output(work(images[i : i + batch_size]), "spectral")
            rec.close()
            chunks.append(rec)
    depth = len(chunks[0].per_block)
    weights = [len(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    total = sum(weights)
    per_block = []
    for b in range(depth):
        row = {}
        for k in chunks[0].per_block[b]:
            row[k] = sum(c.per_block[b][k] * w for c, w in zip(chunks, weights, strict=True)) / total
        per_block.append(row)
    spectra = torch.stack([torch.cat([c.spectra[b] for c in chunks]) for b in range(depth)])  # (depth, N, bands)
    removal: dict[int, dict[str, float]] = {}
    for block in chunks[0].removal:
        removal[block] = {
            k: sum(c.removal[block][k] * w for c, w in zip(chunks, weights, strict=True)) / total
            for k in chunks[0].removal[block]
        }
    return per_block, spectra, removal


_REFERENCE: dict[tuple, tuple[list[dict[str, Any]], Tensor]] = {}


def spectral_metrics(
    model: nn.Module, reducer: TokenReducer, images: Tensor, num_bands: int = 6, key: Any = None
) -> dict[str, Any]:
    """Everything the spectral harness records for one method, relative to the unreduced model."""
    ref_key = (key, tuple(images.shape), num_bands)
    if key is None or ref_key not in _REFERENCE:
        ref_blocks, ref_spectra, _ = block_statistics(model, NoReduction(), images, num_bands)
        if key is not None:
            _REFERENCE[ref_key] = (ref_blocks, ref_spectra)
    else:
        ref_blocks, ref_spectra = _REFERENCE[ref_key]
    blocks, spectra, removal = block_statistics(model, reducer, images, num_bands)
    for row, ref in zip(blocks, ref_blocks, strict=True):
        for k in ("hf_energy", "effective_rank", "stable_rank", "residual_fro"):
            row[f"{k}_unreduced"] = ref[k]
            row[f"{k}_rel"] = row[k] / ref[k] if ref[k] else float("nan")
    rel = sm.relative_band_power(spectra, ref_spectra)  # (depth, N, bands)
    band_rel = [[_mean(rel[b, :, k]) for k in range(num_bands)] for b in range(rel.shape[0])]
    last = blocks[-1]
    return {
        "spectral_images": int(len(images)),
        "spectral_blocks": blocks,
        "spectral_band_rel": band_rel,
        "spectral_removal": {str(k): v for k, v in removal.items()},
        "hf_energy_last_rel": last["hf_energy_rel"],
        "effective_rank_last_rel": last["effective_rank_rel"],
    }
