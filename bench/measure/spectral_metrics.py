"""Frequency content of token sets: what a reducer keeps, smooths away or throws out.

These are pure tensor functions (no model, no I/O) meant to be called from a
``ReductionContext`` observer, ``observe(block, before, after)``, or on final tokens. All of
them work on a batch and return one value per image, computed in float64 so that ratios of
nearly equal energies (tokens late in a ViT are dominated by their mean) stay meaningful.

Two views of "frequency" are measured:

- *Token-space* (graph-signal) frequency, as in the FATR analysis: the low-pass part of a
  token set is its mean over tokens (the DC filter ``11ᵀ/n``), everything else is high
  frequency. :func:`hf_energy_ratio`, :func:`rank_collapse_residual`, :func:`effective_rank`
  and :func:`stable_rank` quantify how much of the set is not explained by one shared vector.
- *Spatial* frequency on the original patch grid: :func:`scatter_to_grid` paints each token
  back onto the patches it covers, then :func:`radial_power_spectrum` measures its 2-D power
  spectrum in radial bands. Comparing reduced and unreduced grids with
  :func:`relative_band_power` shows which spatial frequencies a reducer loses.

:func:`untouched_mask`, :func:`std_score` and :func:`removed_vs_kept_score` answer "what does
each reducer remove": are the tokens it merges or drops the high-frequency ones under FATR's
``std`` score, or the low-frequency ones?

Size weighting
--------------
A merged token of size ``s`` stands for ``s`` patches that the reducer now treats as
identical. Every token-set metric here therefore weights a token by its size, so that a
token of size ``s`` gives exactly the same value as ``s`` copies of it (the tests check
this). Without it, merging would look like it changes the mean and energy of the set merely
because it changes how many rows there are. Tokens of size 0 (empty slots, which
proportional attention masks out) contribute nothing, and the first ``num_prefix`` tokens
(cls, distillation, registers) are always left out: they are not patches.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from methods.base import TokenState

__all__ = [
    "effective_rank",
    "hf_energy_ratio",
    "radial_power_spectrum",
    "rank_collapse_residual",
    "relative_band_power",
    "removed_vs_kept_score",
    "scatter_to_grid",
    "stable_rank",
    "std_score",
    "untouched_mask",
]


# -- token-space metrics ---------------------------------------------------------------------


def _patch_tokens(x: Tensor, size: Tensor | None, num_prefix: int) -> tuple[Tensor, Tensor]:
    """Patch tokens ``(B, M, C)`` and their weights ``(B, M)``, both float64.

    The weights are the sizes (1 when ``size`` is None), with negative sizes treated as 0.
    """
    if x.dim() != 3:
        raise ValueError(f"tokens must be (B, N, C), got shape {tuple(x.shape)}")
    if not 0 <= num_prefix <= x.shape[1]:
        raise ValueError(f"num_prefix={num_prefix} is outside 0..{x.shape[1]} tokens")
    xp = x[:, num_prefix:].to(torch.float64)
    if size is None:
        w = xp.new_ones(xp.shape[:2])
    else:
        if size.shape != x.shape[:2]:
            raise ValueError(f"size must be (B, N) = {tuple(x.shape[:2])}, got {tuple(size.shape)}")
        w = size[:, num_prefix:].to(torch.float64).clamp_min(0.0)
    return xp, w


def _centered(xp: Tensor, w: Tensor) -> Tensor:
    """``X − 1·meanᵀ`` with the size-weighted mean over tokens, rows of weight 0 zeroed.

    The tokens are first shifted by one token of positive weight; the mean is translation
    equivariant, so the result is the same, but identical tokens now give an exactly zero
    residual and a large shared component (the usual case in a ViT) loses no precision.
    """
    if xp.shape[1] == 0:
        return xp
    ref_idx = (w > 0).to(torch.uint8).argmax(dim=1)  # first token of positive weight (0 if none)
    ref = xp.gather(1, ref_idx[:, None, None].expand(-1, 1, xp.shape[-1]))
    d = xp - ref
    wsum = w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    mean = (d * w[..., None]).sum(dim=1, keepdim=True) / wsum[..., None]
    return (d - mean) * (w > 0)[..., None]


def _safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, and 0 where ``den`` is 0 (a set with no energy has no high frequency)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def hf_energy_ratio(x: Tensor, size: Tensor | None = None, num_prefix: int = 0) -> Tensor:
    """Share of the patch tokens' energy outside their mean: ``‖H_f[X]‖²_F / ‖X‖²_F``, (B,).

    ``H_f[X] = X − 1·meanᵀ`` is the high-pass part of the token set under the DC filter
    ``11ᵀ/n``. With sizes ``s_i``: ``mean = Σ s_i x_i / Σ s_i`` and both energies are
    ``Σ s_i ‖·‖²``, i.e. a token of size ``s`` counts as ``s`` identical patches (see the
    module docstring). 0 means every patch token is the same vector (full rank collapse, or
    everything merged into one token); a reducer that averages tokens lowers it. Returns 0
    for an image whose patch tokens carry no energy at all.

    Args:
        x: tokens ``(B, N, C)``, prefix first.
        size: patches per token ``(B, N)``; None means all 1.
        num_prefix: leading tokens to leave out.
    """
    xp, w = _patch_tokens(x, size, num_prefix)
    hf = (_centered(xp, w).square().sum(-1) * w).sum(-1)
    total = (xp.square().sum(-1) * w).sum(-1)
    return _safe_ratio(hf, total)


def _weighted_singular_values(x: Tensor, size: Tensor | None, num_prefix: int) -> Tensor:
    """Singular values ``(B, C)``, descending, of the patch-token matrix with rows scaled by ``√size``.

    ``(√S X)ᵀ(√S X) = Σ s_i x_i x_iᵀ`` is the Gram matrix of the matrix in which each token is
    repeated ``s_i`` times, so the non-zero singular values are those of that matrix. They are
    taken from that ``C×C`` Gram matrix's eigenvalues (float64) rather than from an SVD of the
    ``M×C`` tokens: on DeiT-Tiny's tokens (64 images, 12 blocks) 0.98 s instead of 1.57 s, with
    every value within 1e-13 of the largest of the SVD's (a value's error grows as
    ``eps·σ_max²/σ``, far below what either rank can resolve). Eigenvalues within rounding of zero
    (``≤ max(M, C)·eps·λ_max``, 4× the worst seen on exactly low-rank matrices) are set to 0,
    as an SVD gives them, so a rank-1 set still has effective rank 1. Where ``M < C`` the extra
    values are those zeros, which change neither rank.
    """
    xp, w = _patch_tokens(x, size, num_prefix)
    xw = xp * w.sqrt()[..., None]
    eig = _eigvalsh(xw.mT @ xw).flip(-1)
    tol = max(xw.shape[1], xw.shape[2]) * torch.finfo(eig.dtype).eps * eig[:, :1].clamp_min(0)
    return torch.where(eig > tol, eig, torch.zeros_like(eig)).sqrt()


def _eigvalsh(gram: Tensor) -> Tensor:
    """``torch.linalg.eigvalsh`` of a batch, one LAPACK call per thread instead of threads inside
    each call: at 192 x 192 the solver gains nothing from threads (64 matrices: 0.073 s with 2,
    0.076 s with 1), so splitting the batch over the 2 cores takes 0.040 s. Every matrix is
    solved single-threaded, so the values do not depend on how the batch was split (bit-equal to
    a one-thread solve; within 4e-15 of the largest of a two-thread one)."""
    if gram.device.type != "cpu":
        return torch.linalg.eigvalsh(gram)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if threads <= 1 or gram.shape[0] < 2:
            return torch.linalg.eigvalsh(gram)
        with ThreadPoolExecutor(threads) as pool:
            return torch.cat(list(pool.map(torch.linalg.eigvalsh, gram.chunk(threads))))
    finally:
        torch.set_num_threads(threads)


def effective_rank(x: Tensor, size: Tensor | None = None, num_prefix: int = 0) -> Tensor:
    """Effective rank of the patch tokens (Roy & Vetterli, EUSIPCO 2007), (B,).

    With singular values ``σ`` of the size-weighted patch-token matrix (rows scaled by
    ``√size``), ``p = σ / Σσ`` and ``erank = exp(−Σ p log p)`` with ``0 log 0 = 0``. The
    singular values are L1-normalised, as in the paper (not their squares, which would give a
    different, energy-based entropy). It is a continuous stand-in for the rank: ``n`` for ``n``
    orthogonal tokens of equal norm, 1 for a rank-1 (collapsed) set. A zero matrix gives 0.
    The mean is not removed: the DC component is one of the directions counted.

    Args: as :func:`hf_energy_ratio`.
    """
    return _effective_rank_of(_weighted_singular_values(x, size, num_prefix))


def _effective_rank_of(sv: Tensor) -> Tensor:
    total = sv.sum(-1, keepdim=True)
    p = sv / total.clamp_min(torch.finfo(torch.float64).tiny)
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
    erank = torch.exp(-plogp.sum(-1))
    return torch.where(total[:, 0] > 0, erank, torch.zeros_like(erank))


def stable_rank(x: Tensor, size: Tensor | None = None, num_prefix: int = 0) -> Tensor:
    """Stable rank ``‖X‖²_F / ‖X‖²_2`` of the size-weighted patch tokens, (B,).

    Energy over the energy of the dominant direction: unlike :func:`effective_rank` it is
    insensitive to many small singular values, so it tracks how strongly one direction
    (usually the mean) dominates. ``n`` for ``I_n``, 1 for rank 1, 0 for a zero matrix.

    Args: as :func:`hf_energy_ratio`.
    """
    return _stable_rank_of(_weighted_singular_values(x, size, num_prefix))


def _stable_rank_of(sv: Tensor) -> Tensor:
    if sv.shape[-1] == 0:
        return sv.new_zeros(sv.shape[0])
    return _safe_ratio(sv.square().sum(-1), sv[:, 0].square())


def ranks(x: Tensor, size: Tensor | None = None, num_prefix: int = 0) -> tuple[Tensor, Tensor]:
    """:func:`effective_rank` and :func:`stable_rank` from one singular value decomposition."""
    sv = _weighted_singular_values(x, size, num_prefix)
    return _effective_rank_of(sv), _stable_rank_of(sv)


def _l1inf(a: Tensor, w: Tensor) -> Tensor:
    """Dong et al.'s ``‖A‖_{1,∞} = √(‖A‖_1 ‖A‖_∞)`` of a size-weighted token matrix, (B,).

    ``‖A‖_1`` is the largest column abs sum (over tokens, each weighted by its size, as if
    repeated); ``‖A‖_∞`` the largest row abs sum (over channels) among tokens of positive size.
    """
    aa = a.abs()
    if aa.shape[1] == 0 or aa.shape[2] == 0:
        return aa.new_zeros(aa.shape[0])
    col = (aa * w[..., None]).sum(dim=1).amax(dim=-1)
    row = torch.where(w > 0, aa.sum(dim=-1), torch.zeros_like(w)).amax(dim=-1)
    return (col * row).sqrt()


def rank_collapse_residual(x: Tensor, size: Tensor | None = None, num_prefix: int = 0) -> dict[str, Tensor]:
    """Relative distance of the patch tokens from rank collapse (Dong et al., ICML 2021).

    ``res = X − 1·meanᵀ`` with the size-weighted mean over tokens. Dong et al. define the
    residual with the ``1·xᵀ`` closest to ``X``; the mean is that minimiser in the Frobenius
    norm and is used for both norms here, so the two numbers describe the same residual.

    Returns a dict of (B,) tensors, each 0 for a fully collapsed set:

    - ``'fro'``: ``‖res‖_F / ‖X‖_F`` (size-weighted; the square root of
      :func:`hf_energy_ratio`);
    - ``'l1inf'``: ``‖res‖_{1,∞} / ‖X‖_{1,∞}`` with the paper's composite norm
      ``‖A‖_{1,∞} = √(‖A‖_1 ‖A‖_∞)``, ``‖A‖_1`` the largest column abs sum and ``‖A‖_∞`` the
      largest row abs sum (rows are tokens), a token of size ``s`` counting as ``s`` rows.

    Both are 0 for an image whose patch tokens are all zero.

    Args: as :func:`hf_energy_ratio`.
    """
    xp, w = _patch_tokens(x, size, num_prefix)
    res = _centered(xp, w)
    fro = _safe_ratio((res.square().sum(-1) * w).sum(-1), (xp.square().sum(-1) * w).sum(-1)).sqrt()
    l1inf = _safe_ratio(_l1inf(res, w), _l1inf(xp, w))
    return {"fro": fro, "l1inf": l1inf}


# -- spatial spectrum on the patch grid -----------------------------------------------------


def scatter_to_grid(x: Tensor, source: Tensor, num_prefix: int, grid: tuple[int, int]) -> Tensor:
    """Paint tokens back onto the original patch grid: ``(B, C, H, W)`` in ``x``'s dtype.

    Every original patch ``p`` takes the value of the token that covers it, token ``i``
    covering ``p`` when ``source[b, i, p] > 0``, so a merged token fills all its patches with
    its (mean) value: the picture the rest of the network sees. Patches no token covers
    (pruned ones) are 0. If a patch were covered by several tokens (the repo's bookkeeping
    never does this), it gets their plain average. Patches are laid out row-major,
    ``p = row * W + col``, as timm flattens them; with ``source`` the identity on the patches
    the result is exactly the unreduced grid.

    Note that what "covers" means is the reducer's bookkeeping: EViT's fused token covers the
    patches it absorbed, so they are not zero, whereas plain top-k pruning leaves them 0.

    Args:
        x: tokens ``(B, N, C)``, prefix first.
        source: ``TokenState.source`` ``(B, N, P)`` with ``P = H * W``; prefix rows are ignored.
        num_prefix: leading tokens to leave out.
        grid: ``(H, W)``, the original patch grid (``TokenState.patch_grid``).
    """
    b, n, c = x.shape
    h, w = grid
    if source.shape[:2] != (b, n) or source.shape[2] != h * w:
        raise ValueError(f"source must be (B, N, H*W) = ({b}, {n}, {h * w}), got {tuple(source.shape)}")
    cover = (source[:, num_prefix:] > 0).to(torch.float64)  # (B, M, P)
    xp = x[:, num_prefix:].to(torch.float64)
    # Zero non-finite values of tokens that cover nothing, so 0 * inf cannot leak into sums.
    xp = torch.where(cover.sum(-1, keepdim=True) > 0, xp, torch.zeros_like(xp))
    painted = torch.einsum("bmp,bmc->bcp", cover, xp)
    count = cover.sum(dim=1)[:, None, :]  # (B, 1, P)
    painted = painted / count.clamp_min(1.0)
    return painted.reshape(b, c, h, w).to(x.dtype)


def radial_power_spectrum(grid_tensor: Tensor, num_bands: int) -> Tensor:
    """Mean 2-D power per radial spatial-frequency band, ``(B, num_bands)`` float64.

    Per channel, ``F = fft2`` over the grid (orthonormal, so total power equals the grid's
    energy by Parseval and grids of different size are comparable); power ``|F|²`` is
    averaged over channels and then over the frequency bins of each band. Nothing is
    subtracted first: the DC bin (the mean over patches) is part of band 0.

    Bands split the normalised radius ``r = √(fy² + fx²)`` (``torch.fft.fftfreq``, cycles per
    patch, so ``r`` runs from 0 to ``√(0.5² + 0.5²)``) into ``num_bands`` equal intervals:
    band ``k`` is ``[k·Δ, (k+1)·Δ)`` and the last band is closed so the highest radius (the
    checkerboard, on even grids) falls in it. Band 0, ``[0, Δ)``, always holds the DC bin
    plus whatever other bins have ``r < Δ`` (none when ``Δ ≤ 1/max(H, W)``). A band with no
    bins (fine bands on small grids, or the top bands of an odd grid, whose largest
    frequency is below 0.5) is NaN: its mean power is undefined, not 0.

    Args:
        grid_tensor: ``(B, C, H, W)``, e.g. from :func:`scatter_to_grid`.
        num_bands: number of radial bands, at least 1.
    """
    if grid_tensor.dim() != 4:
        raise ValueError(f"grid_tensor must be (B, C, H, W), got shape {tuple(grid_tensor.shape)}")
    if num_bands < 1:
        raise ValueError(f"num_bands must be at least 1, got {num_bands}")
    b, _, h, w = grid_tensor.shape
    dev = grid_tensor.device
    spec = torch.fft.fft2(grid_tensor.to(torch.float64), norm="ortho")
    power = (spec.real.square() + spec.imag.square()).mean(dim=1).reshape(b, h * w)
    fy = torch.fft.fftfreq(h, dtype=torch.float64, device=dev)
    fx = torch.fft.fftfreq(w, dtype=torch.float64, device=dev)
    radius = (fy[:, None].square() + fx[None, :].square()).sqrt().reshape(-1)
    edges = torch.linspace(0.0, math.sqrt(0.5), num_bands + 1, dtype=torch.float64, device=dev)
    # Index k with edges[k] <= r < edges[k+1]; radii at or past the last edge go to the last band.
    band = torch.bucketize(radius, edges[1:-1], right=True)
    sums = power.new_zeros(b, num_bands).index_add_(1, band, power)
    counts = torch.bincount(band, minlength=num_bands).to(torch.float64)
    return torch.where(counts > 0, sums / counts.clamp_min(1.0), torch.full_like(sums, math.nan))


def relative_band_power(reduced: Tensor, reference: Tensor) -> Tensor:
    """``reduced / reference`` per band, e.g. of a reduced grid against the unreduced one.

    1 means the band's power is preserved, below 1 that the reducer removed it (merging
    smooths, so expect high bands to drop), above 1 that it added some (blocky edges between
    merged regions). Where the reference band has no power (or is NaN, an empty band) the
    ratio is undefined and NaN is returned instead of ``inf`` or a huge number, so that
    ``nanmean`` over images stays finite.
    """
    reduced = reduced.to(torch.float64)
    reference = reference.to(torch.float64)
    ok = reference > 0
    return torch.where(ok, reduced / torch.where(ok, reference, torch.ones_like(reference)), math.nan)


# -- what each reducer removes --------------------------------------------------------------


def std_score(attn: Tensor, valid: Tensor | None = None) -> Tensor:
    """FATR's ``std`` score of every token (key) ``(B, N)``: its high-frequency contribution.

    For head ``h`` and key ``k``, ``‖(I − 11ᵀ/n) A[:, k]‖₂``: the Euclidean norm over queries
    ``q`` of ``A[q, k] − mean_q A[q, k]``, which is exactly the size of token ``k``'s
    contribution to the high-pass part of the attention output. Averaged over heads. A key
    every query attends to equally scores 0. Written independently of ``fatr.scores`` so the
    analysis does not inherit a bug from the method it measures.

    Args:
        attn: attention probabilities ``(B, H, N, N)`` (queries, then keys).
        valid: ``(B, N)`` real tokens; other queries (empty slots) are left out of the mean,
            of the norm and of ``n``. None: all queries count.
    """
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn must be (B, H, N, N), got shape {tuple(attn.shape)}")
    a = attn.to(torch.float64)
    if valid is None:
        q_w = a.new_ones(a.shape[0], 1, a.shape[2], 1)
    else:
        q_w = valid.to(torch.float64)[:, None, :, None]
    n_q = q_w.sum(dim=2, keepdim=True).clamp_min(1.0)
    col_mean = (a * q_w).sum(dim=2, keepdim=True) / n_q
    return (((a - col_mean).square() * q_w).sum(dim=2)).sqrt().mean(dim=1)


def removed_vs_kept_score(
    attn: Tensor, kept: Tensor, num_prefix: int = 0, valid: Tensor | None = None
) -> dict[str, Tensor]:
    """Mean :func:`std_score` of the tokens a reduction changed vs. those it left alone.

    Answers "what does each reducer remove": if ``'removed'`` is above ``'kept'`` the reducer
    takes away high-frequency tokens (which FATR argues should be preserved), if below, it
    compresses the low-frequency ones.

    Args:
        attn: the reduction block's attention probabilities ``(B, H, N, N)`` before reduction.
        kept: ``(B, N)`` True for tokens that survived as they were (see
            :func:`untouched_mask`), False for tokens dropped or merged.
        num_prefix: leading tokens, excluded from both sets (never reduced).
        valid: ``(B, N)`` real tokens (e.g. ``before.size > 0``); others are excluded from
            both sets and, as queries, from the score. None: all tokens are real.

    Returns:
        ``{'removed': (B,), 'kept': (B,)}`` mean scores, NaN for an image where the set is
        empty (nothing removed, or nothing kept).
    """
    if kept.shape != attn.shape[:1] + attn.shape[2:3]:
        raise ValueError(f"kept must be (B, N) = {(attn.shape[0], attn.shape[2])}, got {tuple(kept.shape)}")
    score = std_score(attn, valid)
    cand = torch.ones_like(kept, dtype=torch.bool)
    cand[:, :num_prefix] = False
    if valid is not None:
        cand = cand & valid.bool()
    out = {}
    for name, members in (("removed", cand & ~kept.bool()), ("kept", cand & kept.bool())):
        m = members.to(torch.float64)
        cnt = m.sum(-1)
        mean = (score * m).sum(-1) / cnt.clamp_min(1.0)
        out[name] = torch.where(cnt > 0, mean, torch.full_like(mean, math.nan))
    return out


def untouched_mask(before: TokenState, after: TokenState) -> Tensor:
    """Which tokens of ``before`` survive unchanged in ``after``, ``(B, N_before)`` bool.

    A heuristic, because reducers record no token identity: non-prefix token ``i`` of
    ``before`` counts as untouched when some non-prefix token ``j`` of ``after`` has

    - the same vector up to rounding, ``|x_j − x_i| ≤ 8·eps·|x_i|`` elementwise (eps of
      ``x``'s dtype). Gathering a token copies it bit for bit, but ``merge_all`` (ToMe)
      recomputes every output, so an unmerged token of size ``s`` comes back as ``(s·x)/s``
      and may differ in the last bit; anything that really mixes or re-weights a token
      changes it far more than that;
    - the same size, so a token merged with an identical copy is not taken as kept;
    - the same original patch index ``pos``, unless ``after.pos[j]`` is −1 (``merge_all``
      sets every output position to −1, including those of unmerged tokens);
    - when both states carry source maps, exactly the same covered patches.

    This also recognises tokens merged at an earlier block that pass this one intact
    (``pos`` −1 on both sides). Prefix tokens and empty slots (size 0) of ``before`` are
    False: they are never reduced, so they belong to neither set and
    :func:`removed_vs_kept_score` should exclude them (``num_prefix``, ``valid``). Without
    source maps, two tokens of ``before`` equal in value, size and position would both be
    reported kept if only one survived; for real activations this does not happen.
    """
    xb, xa = before.x, after.x
    if xb.shape[0] != xa.shape[0] or xb.shape[2] != xa.shape[2]:
        raise ValueError(f"before {tuple(xb.shape)} and after {tuple(xa.shape)} differ in batch or channels")
    pb, pa = before.num_prefix, after.num_prefix
    b, nb, c = xb.shape
    mask = torch.zeros(b, nb, dtype=torch.bool, device=xb.device)
    xb_p, xa_p = xb[:, pb:].to(torch.float64), xa[:, pa:].to(torch.float64)
    if xb_p.shape[1] == 0 or xa_p.shape[1] == 0 or c == 0:
        return mask
    finfo = torch.finfo(xb.dtype) if xb.is_floating_point() else torch.finfo(torch.float64)
    rtol, atol = 8 * finfo.eps, finfo.tiny

    def close(u: Tensor, v: Tensor) -> Tensor:
        return (u - v).abs() <= rtol * u.abs() + atol

    sb, sa = before.size[:, pb:], after.size[:, pa:]
    posb, posa = before.pos[:, pb:], after.pos[:, pa:]
    # Cheap necessary conditions on all pairs first (channel 0 only), then the full vectors of
    # the few pairs left: memory stays O(N² + pairs·C) instead of O(N²·C).
    pair = (sb[:, :, None] == sa[:, None, :]) & (sb[:, :, None] > 0)
    pair &= (posb[:, :, None] == posa[:, None, :]) | (posa[:, None, :] == -1)
    pair &= close(xb_p[:, :, None, 0], xa_p[:, None, :, 0])
    bi, i, j = pair.nonzero(as_tuple=True)
    same = close(xb_p[bi, i], xa_p[bi, j]).all(dim=-1)
    if before.source is not None and after.source is not None:
        same &= (before.source[:, pb:][bi, i] == after.source[:, pa:][bi, j]).all(dim=-1)
    hit = torch.zeros(b, nb - pb, dtype=torch.bool, device=xb.device)
    hit[bi[same], i[same]] = True
    mask[:, pb:] = hit
    return mask
