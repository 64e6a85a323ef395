"""The FATR paper's own frequency analysis (its Figures 1, 3, 4 and 6) as pure tensor functions.

The paper does not measure frequency the way :mod:`bench.measure.spectral_metrics` does (token-space
energy outside the mean, radial power bands); it uses the Fourier analysis of Park & Kim,
"How do vision transformers work?" (ICLR 2022), whose reference notebook
(``fourier_analysis.ipynb`` in xxxnell/how-do-vits-work) does, per layer:

1. drop the class token and reshape the patch tokens to the ``h x w`` grid, one map per channel;
2. ``log(|fft2(map)| + 1e-6)`` (unnormalised FFT) per channel and image;
3. average that *log* amplitude over channels and images (so the amplitudes are averaged
   geometrically; the issue's prose says "amplitude averaged, then log", the notebook that
   made the paper's figures takes the log first, and this follows the notebook);
4. read it along the diagonal from the centre of the shifted spectrum (frequency 0) to the
   corner (frequency π on both axes) and subtract the value at 0: the "Δ log amplitude".
   Figure 1b / 3 / 6ab plot its last point per layer.

Two choices are this module's, and documented where they are made:

- **Reduced token sets** are painted back onto the original patch grid through the source map
  (:func:`bench.measure.spectral_metrics.scatter_to_grid`): every patch takes the value of the token
  that now covers it, so a merged token fills all its patches with its value — the picture the
  rest of the network sees. Patches no token covers (plain pruning) are 0.
- **Where π is.** The notebook rolls the spectrum by ``h/2`` and keeps ``diag[h/2:]``, which on
  an even grid stops one bin short of the corner: its last point is ``(1 - 2/h)π`` (6/7 π on
  DeiT's 14x14 grid) and the Nyquist bin, where a checkerboard lives, is left out. Here the
  profile runs over ``k = 0 … ⌊h/2⌋`` so its last point is exactly π on even grids (the
  notebook's last point is the one before it); on odd grids both stop at ``(1 - 1/h)π``, the
  highest frequency the grid has.

The module also holds the paper's two other analyses: each token's cosine similarity to the
(size-weighted) mean token, the "similarity with the DC signal" that over-smoothing drives to 1
(Figure 2b/4b), and the overlap (IoU) of the tokens EViT would keep with the tokens FATR calls
high-frequency, computed from one block's attention (Figure 6c).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bench.measure.spectral_metrics import _patch_tokens
from fatr.scores import hf_scores

__all__ = [
    "PARK_KIM_EPS",
    "cosine_to_mean",
    "diagonal_frequencies",
    "diagonal_log_amplitude",
    "keep_count",
    "relative_log_amplitude",
    "selection_iou",
    "selection_sets",
    "top_k_mask",
]

PARK_KIM_EPS = 1e-6
"""Added to the amplitude before the log, as in Park & Kim's notebook (unnormalised FFT)."""


# -- Fourier analysis of the feature map ------------------------------------------------------


def diagonal_frequencies(n: int) -> Tensor:
    """Per-axis frequency of each point of :func:`diagonal_log_amplitude` on an ``n x n``
    grid, in units of π: ``2k/n`` for ``k = 0 … ⌊n/2⌋`` (0 … 1 on even grids)."""
    if n < 1:
        raise ValueError(f"grid size must be at least 1, got {n}")
    return 2.0 * torch.arange(n // 2 + 1, dtype=torch.float64) / n


def diagonal_log_amplitude(grid: Tensor, eps: float = PARK_KIM_EPS) -> Tensor:
    """Channel-mean log amplitude of the 2-D spectrum along the diagonal, ``(B, K)`` float64.

    Point ``k`` is ``mean_c log(|F_c[k, k]| + eps)`` with ``F_c = fft2`` (unnormalised) of
    channel ``c`` of the ``(H, W)`` map: frequency ``2k/H · π`` on both axes, from the zero
    frequency (``k = 0``) to the corner ``(π, π)`` (``k = H/2`` on even grids; see the module
    docstring for how this differs from the notebook's last point). Averaging over images is
    left to the caller: it is a plain mean of these rows, so per-image values can be paired.

    Only the diagonal is read, as in the paper: a pattern that varies along one axis only has
    no energy there. A constant map has ``log(eps)`` everywhere but at ``k = 0``.

    Args:
        grid: feature maps ``(B, C, H, W)`` with ``H == W``, e.g. from
            :func:`bench.measure.spectral_metrics.scatter_to_grid`.
        eps: added to the amplitude before the log (keeps zero amplitudes finite).
    """
    if grid.dim() != 4:
        raise ValueError(f"grid must be (B, C, H, W), got shape {tuple(grid.shape)}")
    b, c, h, w = grid.shape
    if h != w:
        raise ValueError(f"the diagonal spectrum needs a square patch grid, got {h}x{w}")
    if c == 0 or h == 0:
        raise ValueError(f"grid has no channels or no patches: shape {tuple(grid.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    spec = torch.fft.fft2(grid.to(torch.float64))
    k = torch.arange(h // 2 + 1, device=grid.device)
    return (spec[:, :, k, k].abs() + eps).log().mean(dim=1)


def relative_log_amplitude(log_amplitude: Tensor) -> Tensor:
    """``Δ log amplitude``: each point minus the point at frequency 0 (last dimension).

    Its last entry is the paper's per-layer number ("relative log amplitude of high frequency,
    1.0π"): how far the highest frequency lies below the DC component, in natural-log units.
    """
    return log_amplitude - log_amplitude[..., :1]


# -- over-smoothing ---------------------------------------------------------------------------


def cosine_to_mean(x: Tensor, size: Tensor | None = None, num_prefix: int = 0) -> Tensor:
    """Size-weighted mean cosine similarity of the patch tokens to their mean token, (B,).

    ``μ = Σ s_i x_i / Σ s_i`` is the DC signal of the token set; the result is
    ``Σ s_i cos(x_i, μ) / Σ s_i``. 1 means every token points the way of the mean (full
    over-smoothing), so lower is more diverse. A token of size ``s`` counts as ``s`` copies,
    as in :mod:`bench.measure.spectral_metrics`; prefix tokens and empty slots (size 0) are left out.
    A zero token has cosine 0; an image whose mean token is zero (or that has no patch token)
    gives NaN, as its similarity is undefined.

    Args:
        x: tokens ``(B, N, C)``, prefix first.
        size: patches per token ``(B, N)``; None means all 1.
        num_prefix: leading tokens to leave out.
    """
    xp, w = _patch_tokens(x, size, num_prefix)
    wsum = w.sum(dim=-1)
    tiny = torch.finfo(torch.float64).tiny
    mean = (xp * w[..., None]).sum(dim=1) / wsum.clamp_min(tiny)[:, None]
    mean_norm = mean.norm(dim=-1)
    dots = (xp * mean[:, None, :]).sum(dim=-1)
    cos = dots / (xp.norm(dim=-1) * mean_norm[:, None]).clamp_min(tiny)
    out = (cos * w).sum(dim=-1) / wsum.clamp_min(tiny)
    return torch.where((wsum > 0) & (mean_norm > 0), out, torch.full_like(out, math.nan))


# -- which tokens EViT and FATR would keep ----------------------------------------------------


def keep_count(n: Tensor, keep: float) -> Tensor:
    """Tokens kept of ``n`` candidates at keep rate ``keep``: ``ceil(keep·n)``, at least 1
    (0 when there are no candidates) — the rule of ``KeepRateReducer.num_kept``."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    k = torch.ceil(keep * n.to(torch.float64) - 1e-9).clamp_min(1.0)
    return torch.minimum(k, n.to(torch.float64)).long()


def top_k_mask(score: Tensor, candidates: Tensor, k: Tensor) -> Tensor:
    """``(B, N)`` bool: the ``k[b]`` highest-scoring candidates of each image."""
    s = score.to(torch.float64).masked_fill(~candidates, -math.inf)
    order = s.argsort(dim=-1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (rank < k[:, None]) & candidates


def selection_sets(
    attn: Tensor, keep: float, num_prefix: int, valid: Tensor | None = None, skip: int = 0
) -> dict[str, Tensor]:
    """The tokens EViT would keep and those FATR would call high-frequency, from one attention.

    Both are chosen among the same candidates (non-prefix tokens of positive size after the
    first ``skip`` non-prefix ones, e.g. FATR's DC slots) and keep the same number of them,
    ``keep_count(candidates, keep)``:

    - ``'evit'``: the highest class attention (the first prefix token's attention row,
      averaged over heads), EViT's ranking;
    - ``'fatr'``: the highest FATR ``signed`` HF score (:func:`fatr.scores.hf_scores`, the
      paper's column mean of ``A_HP``), FATR's ranking with its default score.

    On a block where EViT or FATR itself reduces at rate ``keep``, the matching set is exactly
    the set that method keeps (the tests check both). Cost: one pass over the attention map
    the block computed anyway; no extra forward.

    Args:
        attn: the block's attention probabilities ``(B, H, N, N)``.
        keep: keep rate in (0, 1].
        num_prefix: leading tokens (at least 1: EViT needs the class token).
        valid: ``(B, N)`` real tokens (``size > 0``); they are also the queries of the HF score,
            as in FATR. None: all tokens are real.
        skip: non-prefix tokens right after the prefix that are not candidates.

    Returns:
        ``{'evit': (B, N) bool, 'fatr': (B, N) bool}``.
    """
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn must be (B, H, N, N), got shape {tuple(attn.shape)}")
    b, _, n, _ = attn.shape
    if num_prefix < 1:
        raise ValueError("EViT's selection needs a class token: num_prefix must be at least 1")
    if not 0 <= skip <= n - num_prefix:
        raise ValueError(f"skip={skip} is outside 0..{n - num_prefix} non-prefix tokens")
    cand = torch.zeros(b, n, dtype=torch.bool, device=attn.device)
    cand[:, num_prefix + skip :] = True
    if valid is not None:
        if valid.shape != (b, n):
            raise ValueError(f"valid must be (B, N) = {(b, n)}, got {tuple(valid.shape)}")
        cand &= valid.bool()
    k = keep_count(cand.sum(dim=-1), keep)
    cls_attention = attn[:, :, 0, :].mean(dim=1)  # in attn's dtype, exactly as EViT ranks
    hf = hf_scores(attn, "signed", valid)
    return {"evit": top_k_mask(cls_attention, cand, k), "fatr": top_k_mask(hf, cand, k)}


def selection_iou(a: Tensor, b: Tensor) -> Tensor:
    """Intersection over union of two ``(B, N)`` token masks, (B,); NaN where both are empty."""
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.bool(), b.bool()
    inter = (a & b).sum(dim=-1).to(torch.float64)
    union = (a | b).sum(dim=-1).to(torch.float64)
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.full_like(union, math.nan))
