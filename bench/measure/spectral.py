"""Spectral frequency bias: which token-space and spatial frequencies each reducer keeps.

For a fixed set of real images, after every block, the reduced model's tokens are compared
with the unreduced model's tokens at the same block: high-frequency energy ratio, effective
and stable rank, Dong et al.'s rank-collapse residual, and the radial power spectrum of the
tokens painted back onto the patch grid. At each reduction block we also score, with FATR's
``std`` score on that block's attention, the tokens the method removed or merged against the
ones it kept as they were.

The FATR paper's own analysis (:mod:`bench.measure.paper_metrics`) is measured in the same pass: per
block, Park & Kim's Δ log amplitude of the painted feature map from frequency 0 to π and the
tokens' cosine similarity to their mean; per reduction block, the IoU of the tokens EViT would
keep with those FATR calls high-frequency, from that block's attention. The unreduced reference
runs through the patch with the ``none`` reducer, whose activations equal timm's own forward
bit for bit; its IoU is taken at every block from attention recomputed from the block's own
``qkv`` output, which leaves that forward untouched. The reference is the loaded weights
without reduction, so a fine-tuned checkpoint is compared with itself unreduced.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from torch import Tensor, nn

from bench.config import SpectralConfig
from bench.errors import BenchError
from bench.finite import check_finite_output
from bench.measure import paper_metrics as pm
from bench.measure import spectral_metrics as sm
from fatr.reducer import DC_SLOTS
from methods import ATTN, TokenReducer, apply_reducer, reduction_context, remove_reducer
from methods.base import TokenState
from methods.identity import NoReduction

if TYPE_CHECKING:
    from bench.measure.cache import MeasurementCache
    from bench.measure.subject import Measured, Subject


class _SpectralBlockRequired(TypedDict):
    """What every stored block row has."""

    tokens: int
    hf_energy: float
    """‖X − mean‖² / ‖X‖² of the patch tokens, size-weighted."""
    effective_rank: float
    stable_rank: float
    residual_fro: float
    """Dong et al.'s rank-collapse residual (Frobenius; ``residual_l1inf`` the ℓ1,∞ form)."""
    residual_l1inf: float
    hf_energy_unreduced: float
    hf_energy_rel: float
    effective_rank_unreduced: float
    effective_rank_rel: float
    stable_rank_unreduced: float
    stable_rank_rel: float
    residual_fro_unreduced: float
    residual_fro_rel: float


class SpectralBlock(_SpectralBlockRequired, total=False):
    """Token statistics after one block (means over the images), the reference's beside them."""

    fourier_dlog_pi: float
    """The paper's analysis (:func:`paper_metrics`); absent in records from before it."""
    fourier_dlog_pi_unreduced: float
    cos_to_mean: float
    cos_to_mean_unreduced: float


class RemovedVsKept(TypedDict):
    """Mean FATR ``std`` score of the tokens a reduction removed or merged, and of those it kept."""

    removed: float
    kept: float


class _SpectralMetricsRequired(TypedDict):
    """What every stored spectral record has."""

    spectral_images: int
    spectral_blocks: list[SpectralBlock]
    spectral_band_rel: list[list[float]]
    """Per block, power per radial band relative to the unreduced model's."""
    spectral_removal: dict[str, RemovedVsKept]
    """Per reduction block (its index as a string)."""
    hf_energy_last_rel: float
    effective_rank_last_rel: float


class SpectralMetrics(_SpectralMetricsRequired, total=False):
    """What :func:`spectral_metrics` adds to a record's metrics, and what every reader may rely
    on. The paper's analysis (the keys of this class, not of its required base) is missing
    from records written before it."""

    fourier_freq_pi: list[float]
    fourier_profile: list[list[float]]
    fourier_profile_unreduced: list[list[float]]
    fourier_dlog_pi_last: float
    fourier_dlog_pi_last_unreduced: float
    fourier_dlog_pi_last_images: list[float]
    fourier_dlog_pi_last_unreduced_images: list[float]
    cos_to_mean_last: float
    cos_to_mean_last_unreduced: float
    selection_iou_keep: float
    selection_iou: dict[str, float]
    """Per block where it was taken (its index as a string)."""
    selection_iou_unreduced: list[float]


def _mean(t: Tensor) -> float:
    t = t.double()
    t = t[~torch.isnan(t)]
    return float(t.mean()) if t.numel() else float("nan")


def attention_from_qkv(attn: nn.Module, qkv: Tensor) -> Tensor:
    """Attention probabilities ``(B, H, N, N)`` of a timm ``Attention`` from its ``qkv`` output.

    The patch's explicit attention without a bias or gain, so only exact for an unreduced model.
    """
    b, n, _ = qkv.shape
    q, k, _ = qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)


class BlockRecorder:
    """Collects per-block token statistics of one patched model during a forward pass.

    Args:
        model: a patched ViT (``apply_reducer(..., trace_source=True)``).
        num_bands: radial bands of the power spectrum.
        iou_keep: keep rate at which EViT's and FATR's selections are compared.
        attention_everywhere: also take the selection IoU at every block from attention
            recomputed from ``qkv`` (the unreduced reference only).
    """

    def __init__(self, model: nn.Module, num_bands: int, iou_keep: float, attention_everywhere: bool = False) -> None:
        self.model = model
        self.num_bands = num_bands
        self.iou_keep = iou_keep
        self.per_block: list[dict[str, Any]] = []
        self.spectra: list[Tensor] = []
        self.log_amplitude: list[Tensor] = []
        self.cos_to_mean: list[Tensor] = []
        self.iou: dict[int, Tensor] = {}
        self.removal: dict[int, dict[str, float]] = {}
        self.observation = reduction_context(model).observe(self._on_reduction, needs={ATTN})
        self.hooks = [blk.register_forward_hook(self._on_block) for blk in model.blocks]
        if attention_everywhere:
            for i, blk in enumerate(model.blocks):
                self.hooks.append(blk.attn.qkv.register_forward_hook(self._qkv_hook(i)))

    def _on_block(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        st = reduction_context(self.model).state
        x, size, p = st.x.float(), st.size, st.num_prefix
        res = sm.rank_collapse_residual(x, size, p)
        effective, stable = sm.ranks(x, size, p)
        self.per_block.append(
            {
                "tokens": int(x.shape[1]),
                "hf_energy": _mean(sm.hf_energy_ratio(x, size, p)),
                "effective_rank": _mean(effective),
                "stable_rank": _mean(stable),
                "residual_fro": _mean(res["fro"]),
                "residual_l1inf": _mean(res["l1inf"]),
            }
        )
        grid = sm.scatter_to_grid(x, st.source, p, st.patch_grid)
        self.spectra.append(sm.radial_power_spectrum(grid, self.num_bands))
        self.log_amplitude.append(pm.diagonal_log_amplitude(grid))
        self.cos_to_mean.append(pm.cosine_to_mean(x, size, p))

    def _selection_iou(self, block: int, attn: Tensor, state: TokenState) -> None:
        if state.num_prefix < 1:  # no class token: EViT's selection does not exist
            return
        sets = pm.selection_sets(
            attn, self.iou_keep, state.num_prefix, valid=state.size > 0, skip=state.extra.get(DC_SLOTS, 0)
        )
        self.iou[block] = pm.selection_iou(sets["evit"], sets["fatr"])

    def _qkv_hook(self, block: int):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            state = reduction_context(self.model).state
            if state.reduced:
                raise RuntimeError("attention recomputed from qkv is only exact before any reduction")
            self._selection_iou(block, attention_from_qkv(self.model.blocks[block].attn, output), state)

        return hook

    def _on_reduction(self, block: int, before, after) -> None:
        if before.attn is None:
            return
        kept = sm.untouched_mask(before, after)
        scores = sm.removed_vs_kept_score(before.attn, kept, before.num_prefix, valid=before.size > 0)
        self.removal[block] = {k: _mean(v) for k, v in scores.items()}
        self._selection_iou(block, before.attn, before)

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.observation.remove()


@dataclass
class BlockStatistics:
    """What one model's spectral pass measured; per-image tensors keep images paired."""

    per_block: list[dict[str, Any]]
    """Token-set statistics per block, means over images."""
    spectra: Tensor
    """Radial band power ``(depth, images, bands)``."""
    removal: dict[int, dict[str, float]]
    """Mean HF score of removed and kept tokens per reduction block."""
    log_amplitude: Tensor
    """Diagonal log amplitude ``(depth, images, K)`` (:func:`bench.measure.paper_metrics.diagonal_log_amplitude`)."""
    cos_to_mean: Tensor
    """Cosine similarity of the tokens to their mean ``(depth, images)``."""
    iou: dict[int, Tensor]
    """EViT-vs-FATR selection IoU per block where it was taken, ``(images,)`` each."""
    patch_grid: tuple[int, int]


def block_statistics(
    model: nn.Module,
    reducer: TokenReducer,
    images: Tensor,
    num_bands: int,
    iou_keep: float = 0.5,
    batch_size: int = 16,
    attention_everywhere: bool = False,
) -> BlockStatistics:
    """Every per-block statistic of ``model`` with ``reducer`` on ``images`` (see :class:`BlockRecorder`)."""
    if len(images) == 0:
        raise BenchError("the spectral analysis needs at least one image (bench.spectral.images)")
    work = copy.deepcopy(model)
    remove_reducer(work)
    apply_reducer(work, reducer, trace_source=True)
    grid = reduction_context(work).info.patch_grid
    if grid[0] != grid[1]:
        raise BenchError(f"the spectral analysis needs a square patch grid, got {grid[0]}x{grid[1]}")
    chunks = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            rec = BlockRecorder(work, num_bands, iou_keep, attention_everywhere)
            try:
                check_finite_output(work(images[i : i + batch_size]), "spectral")
            finally:
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

    def stack(attr: str) -> Tensor:  # (depth, images, ...)
        return torch.stack([torch.cat([getattr(c, attr)[b] for c in chunks]) for b in range(depth)])

    removal: dict[int, dict[str, float]] = {}
    for block in chunks[0].removal:
        removal[block] = {
            k: sum(c.removal[block][k] * w for c, w in zip(chunks, weights, strict=True)) / total
            for k in chunks[0].removal[block]
        }
    iou = {block: torch.cat([c.iou[block] for c in chunks]) for block in sorted(chunks[0].iou)}
    return BlockStatistics(
        per_block, stack("spectra"), removal, stack("log_amplitude"), stack("cos_to_mean"), iou, grid
    )


_REFERENCE: dict[tuple, BlockStatistics] = {}


def reference_statistics(
    model: nn.Module,
    images: Tensor,
    num_bands: int,
    iou_keep: float = 0.5,
    key: Any = None,
    cache: MeasurementCache | None = None,
) -> BlockStatistics:
    """The unreduced model's statistics: the ``none`` reducer, with the selection IoU at every
    block. Kept per ``key`` in this process and, with ``cache`` (a
    :class:`bench.measure.cache.MeasurementCache` of this model and these images), on disk."""
    ref_key = (key, tuple(images.shape), num_bands, iou_keep)
    if key is not None and ref_key in _REFERENCE:
        return _REFERENCE[ref_key]

    def compute() -> dict[str, Any]:
        ref = block_statistics(model, NoReduction(), images, num_bands, iou_keep, attention_everywhere=True)
        return {f.name: getattr(ref, f.name) for f in fields(BlockStatistics)}

    if cache is not None:
        settings = {"images": list(images.shape), "bands": num_bands, "iou_keep": iou_keep, "batch_size": 16}
        stored, _ = cache.get_or_compute("spectral_reference", settings, compute)
    else:
        stored = compute()
    ref = BlockStatistics(**{**stored, "patch_grid": tuple(stored["patch_grid"])})
    if key is not None:
        _REFERENCE[ref_key] = ref
    return ref


def spectral_metrics(
    model: nn.Module,
    reducer: TokenReducer,
    images: Tensor,
    num_bands: int = 6,
    key: Any = None,
    iou_keep: float = 0.5,
    cache: MeasurementCache | None = None,
) -> SpectralMetrics:
    """Everything the spectral harness records for one method, relative to the unreduced model.

    Args:
        model: the (patched or plain) timm ViT; its weights are the unreduced reference too.
        reducer: the method measured.
        images: the fixed evaluation images, the same for every method.
        num_bands: radial bands of the power spectrum.
        key: caches the unreduced reference across jobs of one process (None: no cache).
        iou_keep: keep rate at which EViT's and FATR's selections are compared.
        cache: keeps the unreduced reference on disk across processes (see :mod:`bench.measure.cache`).
    """
    ref = reference_statistics(model, images, num_bands, iou_keep, key, cache)
    stats = block_statistics(model, reducer, images, num_bands, iou_keep)
    blocks = stats.per_block
    for row, r in zip(blocks, ref.per_block, strict=True):
        for k in ("hf_energy", "effective_rank", "stable_rank", "residual_fro"):
            row[f"{k}_unreduced"] = r[k]
            row[f"{k}_rel"] = row[k] / r[k] if r[k] else float("nan")
    rel = sm.relative_band_power(stats.spectra, ref.spectra)  # (depth, N, bands)
    band_rel = [[_mean(rel[b, :, k]) for k in range(num_bands)] for b in range(rel.shape[0])]
    last = blocks[-1]
    out: SpectralMetrics = {
        "spectral_images": int(len(images)),
        "spectral_blocks": blocks,
        "spectral_band_rel": band_rel,
        "spectral_removal": {str(k): v for k, v in stats.removal.items()},
        "hf_energy_last_rel": last["hf_energy_rel"],
        "effective_rank_last_rel": last["effective_rank_rel"],
    }
    out.update(paper_metrics(stats, ref, iou_keep))
    return out


def paper_metrics(stats: BlockStatistics, ref: BlockStatistics, iou_keep: float) -> dict[str, Any]:
    """The FATR paper's analysis for the record: per block (method and unreduced side by side,
    means over images), the full Δ log amplitude profiles, and the per-image values at the last
    block so that methods measured on the same images can be compared pairwise."""
    dlog = pm.relative_log_amplitude(stats.log_amplitude)  # (depth, N, K)
    dlog_ref = pm.relative_log_amplitude(ref.log_amplitude)
    for b, row in enumerate(stats.per_block):
        row["fourier_dlog_pi"] = _mean(dlog[b, :, -1])
        row["fourier_dlog_pi_unreduced"] = _mean(dlog_ref[b, :, -1])
        row["cos_to_mean"] = _mean(stats.cos_to_mean[b])
        row["cos_to_mean_unreduced"] = _mean(ref.cos_to_mean[b])
    n = dlog.shape[-1]
    freqs = pm.diagonal_frequencies(stats.patch_grid[0])
    return {
        "fourier_freq_pi": [float(f) for f in freqs],
        "fourier_profile": [[_mean(dlog[b, :, k]) for k in range(n)] for b in range(dlog.shape[0])],
        "fourier_profile_unreduced": [[_mean(dlog_ref[b, :, k]) for k in range(n)] for b in range(dlog.shape[0])],
        "fourier_dlog_pi_last": _mean(dlog[-1, :, -1]),
        "fourier_dlog_pi_last_unreduced": _mean(dlog_ref[-1, :, -1]),
        "fourier_dlog_pi_last_images": [float(v) for v in dlog[-1, :, -1]],
        "fourier_dlog_pi_last_unreduced_images": [float(v) for v in dlog_ref[-1, :, -1]],
        "cos_to_mean_last": _mean(stats.cos_to_mean[-1]),
        "cos_to_mean_last_unreduced": _mean(ref.cos_to_mean[-1]),
        "selection_iou_keep": iou_keep,
        "selection_iou": {str(b): _mean(v) for b, v in stats.iou.items()},
        "selection_iou_unreduced": [
            _mean(ref.iou[b]) if b in ref.iou else float("nan") for b in range(len(ref.per_block))
        ],
    }


def spectral_job(section: SpectralConfig, subject: Subject, out: Measured) -> None:
    """The spectral analysis of a reduced model (``bench.spectral``) against the unreduced one,
    whose statistics are kept per ``subject.reference_key`` in this process and in the cache."""
    iou_keep = section.iou_keep
    if isinstance(iou_keep, bool) or not isinstance(iou_keep, (int, float)) or not 0 < iou_keep <= 1:
        raise BenchError(f"bench.spectral.iou_keep must be in (0, 1], got {iou_keep!r}")
    if int(section.images) < 1:
        raise BenchError(f"bench.spectral.images must be at least 1, got {section.images}")
    s = subject
    images = s.data.images[: section.images].to(s.device)
    out.metrics.update(
        spectral_metrics(
            s.model, s.reducer, images, section.bands, key=s.reference_key, iou_keep=float(iou_keep), cache=s.cache
        )
    )
