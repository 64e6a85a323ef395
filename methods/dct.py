"""DCT token reduction: low-pass resampling of the patch tokens along the token axis.

Fourier Transformer (He et al., ACL 2023 Findings, arXiv 2305.15099; code
github.com/LUMIA-Group/FourierTransformer) shortens a sequence of hidden states by taking its
DCT, keeping the lowest coefficients and transforming back at the shorter length. OpenToMe
(github.com/Westlake-AI/OpenToMe, ``opentome/tome/dct.py`` with the timm patch
``opentome/timm/dct.py``) runs it as a token reducer in a ViT; that is the reference for this
module's defaults. Written from that description and the mathematics below.

The step. The ``T`` patch tokens ``x`` (prefix tokens are left out and copied in front
untouched) get an orthonormal DCT-II along the token axis, ``c = C_T x``; the first ``T'``
coefficients are kept and an orthonormal DCT-III of length ``T'`` maps them back, so the
operator is ``M = s · C_T'ᵀ · C_T[:T']`` (``T'×T``), applied to every channel alike.

- **Scale** ``s = √(T'/T)``. The plain truncated orthonormal inverse (the reference, ``s=1``)
  multiplies *every* coefficient by the same ``√(T/T')``, not only the DC one: a basis cosine
  of frequency ``k`` has coefficient ``a·√(T/2)`` at length ``T`` (``a·√T`` for ``k=0``) and
  the length-``T'`` inverse turns it into ``a·√(T/T')`` times the same cosine sampled on ``T'``
  points. One factor therefore fixes all of them: with ``s`` the output is exactly the
  band-limited interpolant of ``x`` (its first ``T'`` cosines) sampled at the centres of ``T'``
  equal cells, so a constant sequence stays that constant (every row of ``M`` sums to 1; every
  column to ``T'/T``), and the mean token is kept. Without it, patch tokens grow by
  ``√(T/T')`` per step (×1.41 over the reference's whole schedule): the LayerNorms undo that
  inside each branch, but it shifts the balance between the residual stream and what the
  branches add to it.
- **How it is computed.** Two routes to the same ``M`` (equal to rounding, tested), chosen by
  the sequence length (:func:`dct_resample`). Up to :data:`DENSE_MAX_TOKENS` tokens (every
  block of a 224-px model): ``M`` itself, one matrix product with a cached float32 copy
  (:func:`dct_operator`); at that size ``T'·T·C`` multiply-adds in one well-threaded kernel
  beat the FFT's few (on the project's 2-core CPU a 196-token step is several times faster, at
  batch 1 and 32 alike, timed in one process). Above it, where ``M`` grows as ``T²``
  (gigabytes at 4096 px) and the FFT's ``O(C·T log T)`` wins (from about 600 tokens on that
  CPU): the symmetric extension ``[x, flip(x)]`` (length ``2T``) has the DFT
  ``Y_k = 2·e^{iπk/2T}·X_k`` (``X`` the unnormalised DCT-II), so the step is one ``rfft`` of length
  ``2T``, the first ``T'`` bins times a constant phase ``(T'/T)·e^{iπk(1/2T' − 1/2T)}``, and
  one ``irfft`` of length ``2T'`` whose first ``T'`` samples are the result
  (:func:`dct_resample_fft`). The constants (operators, phase vectors) are built once per
  ``(T, T', device, dtype)`` and cached; a cached constant enters a ``torch.compile`` graph as
  an input, so it is neither rebuilt per forward nor a graph break.
  :func:`dct_resample_matrix` builds ``M`` in float64, for tests and analysis.
- **2-D variant** (``mode="2d"``, not in the reference): the patch tokens are the ``h×w``
  grid they are (``state.grid``), the same resampling runs along the rows and along the
  columns (a separable 2-D DCT keeping the low ``h'×w'`` block, inverted at ``h'×w'``), and
  the result is again a grid, recorded in ``state.grid``. ``h'×w'`` is the grid whose size is
  closest to the 1-D schedule's count after that block (:func:`methods.pool.pooled_grid`, the
  rule pooling uses; rounding does not accumulate over the blocks), so a step may shrink one
  axis only (14×14 → 13×14) or none.

Which blocks and how many tokens (the reference's schedule). ``keep_rate`` is the fraction of
the patch tokens left after the last step, ``ceil(keep_rate·P)`` (the budget knob); the
``P − kept`` removed tokens are spread over the reducing blocks (every block by default) the
way OpenToMe's evaluation does: ToMe's linear ``(r, inflection)`` schedule with
``inflection=-0.5`` (decreasing, from ``1.5r`` to ``0.5r``), ``r`` the integer whose schedule
total is closest to ``P − kept`` (ties: the smaller ``r``), and the rest of the difference added
to the first block (the last one for ``inflection >= 0``). A block removes at most half of its
tokens (``r = min(r, T // 2)``, as the reference caps it) and never adds any. The reference
evaluates DeiT at ``merge_num=98`` of 196 patches, i.e. ``keep_rate=0.5``: per block
``[8, 12, 11, 10, 10, 9, 8, 7, 7, 6, 5, 5]``.

Sizes and source map. The step mixes every token into every other one (``M`` is dense, and
has negative lobes), so no output token *is* a set of patches. This module records the
geometric reading of ``M``: output token ``m`` is the interpolant sampled at the centre of cell
``[m/T', (m+1)/T')`` of the (raster-order) token axis, so it stands for that cell.

- ``size``: every patch token gets the same share ``Σ size / T'`` (``T/T'`` per step,
  ``P/T'`` overall); prefix tokens keep theirs. Sizes sum to the patch count.
- ``source`` (when traced): the area overlap of the cells, ``W[m, n] = T·|cell_m ∩ cell_n|``
  (non-negative, rows sum to ``T/T'``, columns to 1), applied to the incoming map; in 2-D the
  product of the row and column overlaps. Every patch stays covered with total weight 1, a
  token's row sums to its size, and :func:`bench.measure.spectral_metrics.scatter_to_grid`
  paints each patch with the tokens whose cells overlap it (one or two per axis).
- ``pos`` is −1 for every patch token after a step (they are no longer original patches).
- ``grid``: ``None`` after a 1-D step (``T'`` tokens are no grid), ``(h', w')`` after a 2-D
  one.

Deviations from the reference, and why:

1. the ``√(T'/T)`` scale above (the reference keeps ``s = 1``), so the operator preserves
   constants and the mean token; ``rescale=False`` is the reference's plain inverse;
2. where it runs: the reference transforms after the block's MLP, this harness reduces
   between the attention residual and the MLP (the one place every method uses), so block
   ``b``'s MLP already sees the ``T'`` tokens. The same blocks and counts; a step in the last
   block saves MLP MACs there (the reference's last step changes nothing but costs nothing);
3. every prefix token (class, distillation, registers) is protected; the reference protects
   only the class token and transforms a distillation token with the patches;
4. the transform is computed in float32 (float64 stays float64) and cast back to the model's
   dtype; the reference returns float32 tokens into a half-precision model;
5. sizes and a source map are recorded (the reference tracks neither: its source map is
   "None" in OpenToMe's table), as described above; proportional attention is off by default,
   as in the reference (its DCT block calls attention without sizes), and ``prop_attn=True``
   turns it on with the sizes above (uniform per image, so it only re-weights patch tokens
   against prefix tokens);
6. ``keep_rate`` instead of the reference's ``merge_num``, so the budget can be solved as for
   the other methods; ``blocks`` restricts the schedule to some blocks (the reference: all);
7. cost: the reference computes the DCT by FFT (Makhoul's reordering); this module by a
   dense product up to :data:`DENSE_MAX_TOKENS` tokens and by FFT (the symmetric extension)
   above: the same transform. The dense products are matmuls, so they are counted
   (:meth:`DCT.overhead_macs_per_block`, ``T'·T·C`` per step) and budgets pay for them; an
   FFT counts 0, in fvcore as here (by the usual ``~1.25·N·log2 N`` multiply-adds per real
   FFT of length ``N``, a fraction of the dense count). Under inductor the FFT route's
   complex multiply falls back to eager kernels (a warning), the result is the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from methods.base import ModelInfo, ReducerConfigError, TokenReducer, TokenState, check_block_indices, check_keep_rate
from methods.pool import known_grid, pooled_grid
from methods.precision import without_autocast
from methods.tokens import register_constant_cache
from methods.tome import tome_schedule

MODES = ("1d", "2d")

# -- the transform ---------------------------------------------------------------------------------


def dct_matrix(n: int, dtype: torch.dtype = torch.float64, device: torch.device | None = None) -> Tensor:
    """The orthonormal DCT-II matrix ``C_n`` (``n×n``; rows are frequencies): ``c = C_n x``."""
    k = torch.arange(n, dtype=torch.float64, device=device)[:, None]
    i = torch.arange(n, dtype=torch.float64, device=device)[None, :]
    c = torch.cos(math.pi * k * (2 * i + 1) / (2 * n)) * math.sqrt(2.0 / n)
    c[0] = c[0] / math.sqrt(2.0)
    return c.to(dtype)


def dct_resample_matrix(n: int, n_out: int, scaled: bool = True, device: torch.device | None = None) -> Tensor:
    """The step as a dense float64 operator ``M`` (``n_out×n``): keep the first ``n_out``
    orthonormal DCT-II coefficients of length ``n``, invert at length ``n_out``; ``scaled``
    multiplies by ``√(n_out/n)`` (this module), ``False`` is the reference's plain inverse."""
    m = dct_matrix(n_out, device=device).T @ dct_matrix(n, device=device)[:n_out]
    return m * math.sqrt(n_out / n) if scaled else m


_CONSTANTS: dict[tuple, Tensor] = {}
"""Cached constants by ``(kind, n, n_out, device, dtype[, rescale])``; a handful per resolution."""
_MAX_CONSTANTS = 512
register_constant_cache(_CONSTANTS.clear)


def _cached(key: tuple, build) -> Tensor:
    value = _CONSTANTS.get(key)
    if value is None:
        if len(_CONSTANTS) >= _MAX_CONSTANTS:  # many resolutions in one process: start over
            _CONSTANTS.clear()
        with torch.inference_mode(False):  # kept across forwards: training ones too
            value = build()
        _CONSTANTS[key] = value
    return value


def dct_phase(n: int, n_out: int, device: torch.device, dtype: torch.dtype, rescale: bool = True) -> Tensor:
    """``(n_out/n)·exp(iπk(1/2n_out − 1/2n))`` for ``k < n_out`` (complex ``dtype``), cached;
    ``rescale=False`` multiplies it by ``√(n/n_out)`` (the reference's plain inverse)."""

    def build() -> Tensor:
        # built on the device: a host-to-device copy in a CUDA forward would synchronise
        k = torch.arange(n_out, dtype=torch.float64, device=device)
        angle = k * (math.pi / (2 * n_out) - math.pi / (2 * n))
        magnitude = n_out / n if rescale else math.sqrt(n_out / n)
        return torch.polar(torch.full_like(angle, magnitude), angle).to(dtype=dtype)

    return _cached(("phase", n, n_out, device, dtype, rescale), build)


DENSE_MAX_TOKENS = 512
"""Longest sequence :func:`dct_resample` resamples with the dense operator (at most 1 MiB in
float32); longer ones go by FFT. On the project's CPU the two cost the same near 500-600 tokens."""


def takes_dense_route(n: int) -> bool:
    """Whether :func:`dct_resample` applies the dense operator to a sequence of ``n`` (the
    one routing rule, which :func:`dense_resample_macs` counts by)."""
    return n <= DENSE_MAX_TOKENS


def dct_operator(n: int, n_out: int, device: torch.device, dtype: torch.dtype, rescale: bool = True) -> Tensor:
    """:func:`dct_resample_matrix` in ``dtype`` on ``device``, cached (built in float64)."""

    def build() -> Tensor:
        # built on the device, as the phases are: a host-to-device copy would synchronise
        return dct_resample_matrix(n, n_out, scaled=rescale, device=device).to(dtype=dtype)

    return _cached(("operator", n, n_out, device, dtype, rescale), build)


def _check_lengths(x: Tensor, n_out: int, dim: int) -> tuple[int, int]:
    dim = dim % x.dim()
    n = int(x.shape[dim])
    if not 1 <= n_out <= n:
        raise ValueError(f"dct_resample: cannot resample {n} tokens to {n_out}")
    return dim, n


def dct_resample(x: Tensor, n_out: int, dim: int = 1, rescale: bool = True) -> Tensor:
    """``M`` of :func:`dct_resample_matrix` applied along ``dim`` of ``x`` (length ``n`` →
    ``n_out``): as one product with the dense operator up to :data:`DENSE_MAX_TOKENS` tokens,
    by FFT above (:func:`dct_resample_fft`). Computed in float32 at least, returned in
    ``x``'s dtype. ``rescale=False``: the reference's plain truncated inverse, ``√(n/n_out)``
    times larger."""
    dim, n = _check_lengths(x, n_out, dim)
    if n_out == n:
        return x
    if not takes_dense_route(n):
        return dct_resample_fft(x, n_out, dim, rescale)
    compute = torch.promote_types(x.dtype, torch.float32)
    m = dct_operator(n, n_out, x.device, compute, rescale)
    # autocast (bench.latency.amp) would run the product in bf16, where the FFT route and this
    # module's float32 promise do not
    with without_autocast(x.device):
        return _apply_operator(m, x.to(compute), dim).to(x.dtype)


def _apply_operator(m: Tensor, x: Tensor, dim: int) -> Tensor:
    """``m`` (``n_out×n``) applied along ``dim`` of ``x``: one batched product on ``x`` viewed
    as ``(before, n, after)`` (no copy for the token axis of a token tensor, nor for either axis
    of a contiguous grid), whose operand shapes give fvcore the true multiply-accumulates
    (``torch.matmul`` with a 2-D ``m`` counts one batch element only)."""
    n_out, n = m.shape
    if dim == x.dim() - 1:
        return x @ m.T
    before, after = math.prod(x.shape[:dim]), math.prod(x.shape[dim + 1 :])
    out = torch.bmm(m.expand(before, n_out, n), x.reshape(before, n, after))
    return out.view(*x.shape[:dim], n_out, *x.shape[dim + 1 :])


def dense_resample_macs(n: int, n_out: int, others: int) -> int:
    """Multiply-accumulates of :func:`dct_resample` along an axis of length ``n`` with
    ``others`` elements across the other axes: ``n_out·n·others`` on the dense route, 0 when
    nothing changes or on the FFT route (which fvcore, like the harness, counts as 0)."""
    if n_out == n or not takes_dense_route(n):
        return 0
    return n_out * n * others


def dct_resample_fft(x: Tensor, n_out: int, dim: int = 1, rescale: bool = True) -> Tensor:
    """:func:`dct_resample` by FFT, in ``O(n log n)`` time and ``O(n)`` memory: ``rfft`` of
    the symmetric extension, the first ``n_out`` bins times :func:`dct_phase`, ``irfft`` of
    length ``2·n_out``, its first ``n_out`` samples.

    The transforms run along the last axis: the symmetric extension is a copy anyway, and made
    with the token axis last it is contiguous along the transform, which the CPU FFT runs 1.7×
    faster at batch 32 than along a strided axis (bit for bit the same result)."""
    dim, n = _check_lengths(x, n_out, dim)
    if n_out == n:
        return x
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    last = xf.movedim(dim, -1)
    spectrum = torch.fft.rfft(torch.cat([last, last.flip(-1)], dim=-1), dim=-1)[..., :n_out]
    complex_dtype = torch.complex128 if compute == torch.float64 else torch.complex64
    phase = dct_phase(n, n_out, x.device, complex_dtype, rescale)
    out = torch.fft.irfft(spectrum * phase, n=2 * n_out, dim=-1)[..., :n_out]
    return out.movedim(-1, dim).to(x.dtype)


def overlap_matrix(n: int, n_out: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``W[m, j] = n·|[m/n_out, (m+1)/n_out) ∩ [j/n, (j+1)/n)|`` (``n_out×n``), cached: how much
    of input cell ``j`` output cell ``m`` covers. Rows sum to ``n/n_out``, columns to 1."""

    def build() -> Tensor:
        m = torch.arange(n_out, dtype=torch.float64, device=device)[:, None]
        j = torch.arange(n, dtype=torch.float64, device=device)[None, :]
        # in units of 1/(n·n_out): cell m is [m·n, (m+1)·n), cell j is [j·n_out, (j+1)·n_out)
        inter = (torch.minimum((m + 1) * n, (j + 1) * n_out) - torch.maximum(m * n, j * n_out)).clamp_min(0)
        return (inter / n_out).to(dtype=dtype)

    return _cached(("overlap", n, n_out, device, dtype), build)


# -- one step on a token state ---------------------------------------------------------------------


def _patch_state(state: TokenState, x: Tensor, source: Tensor | None, grid: tuple[int, int] | None) -> TokenState:
    """``state`` with its patch tokens replaced by ``x`` (B, T', C): equal sizes, pos −1."""
    p = state.num_prefix
    b, n_out = x.shape[:2]
    share = state.size[:, p:].sum(dim=-1, keepdim=True) / n_out
    return state.replace(
        x=torch.cat([state.x[:, :p], x], dim=1),
        size=torch.cat([state.size[:, :p], share.expand(b, n_out)], dim=1),
        pos=torch.cat([state.pos[:, :p], torch.full_like(state.pos[:, :1], -1).expand(b, n_out)], dim=1),
        source=None if source is None else torch.cat([state.source[:, :p], source], dim=1),
        grid=grid,
        reduced=True,
    )


def dct_reduce_1d(state: TokenState, n_out: int, rescale: bool = True) -> TokenState:
    """Resample the patch tokens of ``state`` (raster order) to ``n_out`` along the token axis."""
    p = state.num_prefix
    n = state.num_tokens - p
    if n_out == n:
        return state
    x = dct_resample(state.x[:, p:], n_out, dim=1, rescale=rescale)
    source = None
    if state.source is not None:
        w = overlap_matrix(n, n_out, state.source.device, state.source.dtype)
        source = torch.matmul(w, state.source[:, p:])
    return _patch_state(state, x, source, grid=None)


def current_grid(state: TokenState) -> tuple[int, int]:
    """The grid the patch tokens of ``state`` lie on; a clear error when the layout is lost."""
    n = state.num_tokens - state.num_prefix
    if state.grid is None or state.grid[0] * state.grid[1] != n:
        raise ReducerConfigError(
            f"dct mode='2d' needs the {n} patch tokens laid out on a grid, but state.grid is {state.grid} "
            "(an earlier reduction lost the layout)"
        )
    return state.grid


def dct_reduce_2d(state: TokenState, out: tuple[int, int], rescale: bool = True) -> TokenState:
    """Resample the patch-token grid of ``state`` (``state.grid``, row-major) to ``out``,
    separably: rows, then columns."""
    p = state.num_prefix
    h, w = current_grid(state)
    ho, wo = out
    if (ho, wo) == (h, w):
        return state
    b, _, c = state.x.shape
    grid = state.x[:, p:].reshape(b, h, w, c)
    grid = dct_resample(dct_resample(grid, ho, dim=1, rescale=rescale), wo, dim=2, rescale=rescale)
    source = None
    if state.source is not None:
        src = state.source[:, p:].reshape(b, h, w, -1)
        wh = overlap_matrix(h, ho, src.device, src.dtype)
        ww = overlap_matrix(w, wo, src.device, src.dtype)
        source = torch.einsum("ih,bhwq,jw->bijq", wh, src, ww).reshape(b, ho * wo, -1)
    return _patch_state(state, grid.reshape(b, ho * wo, c), source, grid=(ho, wo))


# -- the schedule ----------------------------------------------------------------------------------


def merge_schedule(total: int, steps: int, inflection: float = -0.5) -> list[int]:
    """Tokens to remove at each of ``steps`` blocks, ``total`` in all, as OpenToMe's
    evaluation spreads them: ToMe's ``(r, inflection)`` schedule for the integer ``r`` whose
    total is closest to ``total`` (ties: the smaller ``r``), the remainder added to the first
    step (``inflection < 0``) or the last."""
    if steps <= 0:
        return []
    best_r, best_gap = 0, abs(total)
    for r in range(1, total):
        gap = abs(sum(tome_schedule(r, steps, inflection)) - total)
        if gap < best_gap:
            best_r, best_gap = r, gap
        elif gap > best_gap:  # totals only grow with r
            break
    schedule = tome_schedule(best_r, steps, inflection) if best_r else [0] * steps
    schedule[0 if inflection < 0 else -1] += total - sum(schedule)
    return schedule


_PLANS: dict[tuple, tuple] = {}


@torch.compiler.assume_constant_result
def dct_plan(
    grid: tuple[int, int],
    depth: int,
    blocks: tuple[int, ...] | None,
    keep_rate: float,
    inflection: float,
    mode: str,
) -> tuple[tuple[int, tuple[int, int]], ...]:
    """Per block: (patch tokens entering it, the output grid: ``(h', w')`` in 2-D, ``(T', 1)``
    in 1-D). A pure function of its arguments, cached; ``torch.compile`` calls it while
    tracing and takes the result as a constant (no Python loop is traced).

    1-D: block ``b`` removes ``min(r_b, T // 2)`` (:func:`merge_schedule`, the reference's cap).
    2-D: the grid closest to the 1-D count after that block (:func:`methods.pool.pooled_grid`),
    so rounding to grids does not accumulate over the blocks.
    """
    key = (tuple(grid), depth, blocks, keep_rate, inflection, mode)
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    h, w = grid
    num_patches = h * w
    kept = max(1, min(num_patches, math.ceil(keep_rate * num_patches - 1e-9)))
    where = list(range(depth)) if blocks is None else [b for b in blocks if b < depth]
    remove = dict(zip(where, merge_schedule(num_patches - kept, len(where), inflection), strict=True))
    steps = []
    target, n, cur = num_patches, num_patches, (h, w)
    for block in range(depth):
        target -= max(0, min(remove.get(block, 0), target // 2))
        if mode == "2d":
            out = pooled_grid(cur[0], cur[1], target) if target < n else cur
        else:
            out = (target, 1)
        steps.append((n, out))
        n, cur = out[0] * out[1], out
    if len(_PLANS) >= 1024:
        _PLANS.clear()
    plan = _PLANS[key] = tuple(steps)
    return plan


# -- the reducer -----------------------------------------------------------------------------------


class DCT(TokenReducer):
    """DCT token reduction (Fourier Transformer as run by OpenToMe): per reducing block, keep
    the lowest DCT coefficients of the patch tokens and transform back at the shorter length.

    Args:
        keep_rate: fraction of the patch tokens left after the last reduction,
            ``ceil(keep_rate * P)`` (the budget knob); the reference's DeiT setting removes 98 of
            196 patches, ``0.5``.
        inflection: shape of the per-block schedule (ToMe's): ``-0.5`` (the reference) removes
            1.5x the average in the first block down to 0.5x in the last, ``0`` the same number
            in every block, ``1`` increasing; in ``[-1, 1]``.
        blocks: the blocks that reduce (0-based, strictly increasing); ``None`` (the reference)
            every block. The schedule spreads the total over these blocks.
        mode: ``"1d"`` (the reference): the DCT runs along the raster-ordered token sequence;
            ``"2d"``: a separable DCT over the patch grid, keeping a low ``h'×w'`` block, so the
            tokens stay a grid.
        prop_attn: proportional attention with the tokens' sizes (each patch token stands for
            ``P / T'`` patches); off, as in the reference.
        rescale: multiply the truncated inverse by ``√(T'/T)`` so constants (and the mean
            token) are kept; ``False`` is the reference's plain inverse (tokens grow by
            ``√(T/T')`` per step).
    """

    budget_knob = "keep_rate"
    budget_range = (0.02, 1.0)

    def __init__(
        self,
        keep_rate: float = 0.5,
        inflection: float = -0.5,
        blocks: Sequence[int] | None = None,
        mode: str = "1d",
        prop_attn: bool = False,
        rescale: bool = True,
    ) -> None:
        check_keep_rate(keep_rate)
        if not isinstance(inflection, (int, float)) or isinstance(inflection, bool) or not -1 <= inflection <= 1:
            raise ReducerConfigError(f"dct inflection must be a number in [-1, 1], got {inflection!r}")
        if blocks is not None:
            if isinstance(blocks, int) and not isinstance(blocks, bool):
                blocks = [blocks]
            if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence):
                raise ReducerConfigError(f"dct blocks must be a list of block indices or null, got {blocks!r}")
            blocks = list(blocks)
            for b in blocks:
                if not isinstance(b, int) or isinstance(b, bool) or b < 0:
                    raise ReducerConfigError(f"reduction block index {b!r} must be a non-negative integer")
            if not blocks or blocks != sorted(set(blocks)):
                raise ReducerConfigError(f"dct blocks must be non-empty and strictly increasing, got {blocks}")
        if mode not in MODES:
            raise ReducerConfigError(f"dct mode must be one of {', '.join(MODES)}, got {mode!r}")
        for name, flag in (("prop_attn", prop_attn), ("rescale", rescale)):
            if not isinstance(flag, bool):
                raise ReducerConfigError(f"dct {name} must be true or false, got {flag!r}")
        super().__init__(
            keep_rate=keep_rate, inflection=inflection, blocks=blocks, mode=mode, prop_attn=prop_attn, rescale=rescale
        )
        self.keep_rate = float(keep_rate)
        self.inflection = float(inflection)
        self.blocks: tuple[int, ...] | None = None if blocks is None else tuple(blocks)
        self.mode = mode
        self.rescale = rescale

    def bind(self, info: ModelInfo) -> None:
        if self.blocks is not None:
            check_block_indices(list(self.blocks), info.depth)
        super().bind(info)

    def plan(self, grid: tuple[int, int], depth: int) -> tuple[tuple[int, tuple[int, int]], ...]:
        """Per block: patch tokens entering it and the output grid (see :func:`dct_plan`)."""
        return dct_plan(tuple(grid), depth, self.blocks, self.keep_rate, self.inflection, self.mode)

    def notes(self) -> list[str]:
        """One line when the bound model ends with another patch count than ``keep_rate`` asks
        for: a block removes at most half its tokens (the reference's cap), and in 2-D the grids
        only come close to the schedule's counts."""
        if self.info is None:
            return []
        p = self.info.num_patches
        out = self.plan(self.info.patch_grid, self.info.depth)[-1][1]
        kept, want = out[0] * out[1], max(1, min(p, math.ceil(self.keep_rate * p - 1e-9)))
        if kept == want:
            return []
        why = "a block removes at most half its tokens" + (", and grids only come close" if self.mode == "2d" else "")
        return [f"keeps {kept} of {p} patch tokens, not the {want} asked ({why})"]

    def reduces_at(self, block: int) -> bool:
        return self.blocks is None or block in self.blocks

    def reduce(self, state: TokenState, block: int) -> TokenState:
        depth = self.info.depth if self.info is not None else block + 1
        n_in, out = self.plan(state.patch_grid, depth)[block]
        n = state.num_tokens - state.num_prefix
        if n != n_in:
            raise RuntimeError(f"dct: {n} patch tokens enter block {block}, the schedule expects {n_in}")
        if self.mode == "2d":
            return dct_reduce_2d(state, out, self.rescale)
        return dct_reduce_1d(state, out[0], self.rescale)

    def _start_grid(self, num_patches: int) -> tuple[int, int]:
        grid = known_grid(self.info, num_patches)
        if grid is not None:
            return grid
        if self.mode == "1d":
            return num_patches, 1  # 1-D needs only the count
        raise ReducerConfigError(
            f"dct cannot tell the grid layout of {num_patches} patches; bind the reducer to the model first"
        )

    def token_counts(self, num_prefix: int, num_patches: int, depth: int) -> list[tuple[int, int]]:
        counts = []
        for n_in, out in self.plan(self._start_grid(num_patches), depth):
            counts.append((num_prefix + n_in, num_prefix + out[0] * out[1]))
        return counts

    def overhead_macs_per_block(self, num_prefix: int, num_patches: int, depth: int, dim: int, heads: int) -> list[int]:
        """The dense route's products (:func:`dense_resample_macs`): ``T'·T·C`` in 1-D; in 2-D
        ``h'·h·w·C`` along the rows, then ``w'·w·h'·C`` along the columns. The source map's
        products, which only analysis runs trace, are not counted."""
        macs = []
        grid = self._start_grid(num_patches)
        for n_in, out in self.plan(grid, depth):
            if self.mode == "2d":
                (h, w), (ho, wo) = grid, out
                macs.append(dense_resample_macs(h, ho, w * dim) + dense_resample_macs(w, wo, ho * dim))
            else:
                macs.append(dense_resample_macs(n_in, out[0], dim))
            grid = out
        return macs
