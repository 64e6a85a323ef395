"""How much each token contributes to the high-frequency part of attention.

With ``A = A_LP + A_HP`` and ``A_LP = 11ᵀ/n`` (the DC filter), a token whose attention column
deviates from uniform feeds high frequencies into the block's output. The paper scores tokens
by the column mean of ``A_HP``; since ``mean_q(A[q,k] - 1/n)`` is a constant shift of the mean
attention a token receives, the ``signed`` score ranks like plain attention received. ``abs``
and ``std`` are the alternatives the description leaves open: ``std`` is the exact size of
token k's contribution to ``H_f`` of the attention output, ``‖(I - 11ᵀ/n) A[:, k]‖``.

``svd`` is the seed document's spectral cue: token k's leverage on the dominant singular
directions of the head-averaged high-pass attention ``A_HP``, i.e. the energy of its column
that lies in the top-``rank`` left singular subspace, ``‖U_rᵀ A_HP[:, k]‖² = Σ_i σ_i² V[k, i]²``.
A token scores high when it drives the strongest non-uniform attention patterns. ``U_r``
comes from ``torch.linalg.svd`` (``iters=None``) or from a randomised range finder with
``iters`` steps of subspace (power) iteration, which costs a few ``N x N x rank`` products.
"""

from __future__ import annotations

import torch
from torch import Tensor

SCORES = ("signed", "abs", "std", "svd")


def hf_scores(
    attn: Tensor,
    variant: str = "signed",
    valid: Tensor | None = None,
    svd_rank: int = 4,
    svd_iters: int | None = 2,
) -> Tensor:
    """Score every token (column) of ``attn`` (B, H, N, N); higher = more high-frequency.

    ``valid`` (B, N) marks real tokens: empty DC slots (size 0) are neither counted as
    queries nor in ``n``. Heads are averaged; queries are averaged (``signed``, ``abs``) or
    reduced by the Euclidean norm (``std``).
    """
    if variant not in SCORES:
        raise ValueError(f"unknown FATR score {variant!r}; choose one of {', '.join(SCORES)}")
    if variant == "svd":
        return svd_scores(attn, valid, svd_rank, svd_iters)
    a = attn.float()
    b, _, n, _ = a.shape
    if valid is None:
        q_w = a.new_ones(b, 1, 1, n)
    else:
        q_w = valid.float()[:, None, None, :]
    n_valid = q_w.sum(dim=-1, keepdim=True)  # (B, 1, 1, 1)
    # Weighted sums over queries as batched row-vector products: one pass over A, no copies.
    col_sum = (q_w @ a)[:, :, 0]  # (B, H, N): sum_q w_q A[q, k]
    if variant == "signed":
        return ((col_sum - 1.0) / n_valid[:, :, 0]).mean(dim=1)
    if variant == "abs":
        return ((q_w @ (a - 1.0 / n_valid).abs_())[:, :, 0] / n_valid[:, :, 0]).mean(dim=1)
    centred = a - (col_sum / n_valid[:, :, 0])[:, :, None, :]
    energy = (q_w @ centred.square_())[:, :, 0]
    return energy.sqrt().mean(dim=1)


def high_pass(attn: Tensor, valid: Tensor | None = None) -> Tensor:
    """Head-averaged ``A_HP = A - 11ᵀ/n`` ``(B, N, N)``; rows and columns of invalid tokens are 0."""
    a = attn.float().mean(dim=1)
    if valid is None:
        return a - 1.0 / a.shape[-1]
    v = valid.float()
    n_valid = v.sum(-1)[:, None, None]
    return (a - 1.0 / n_valid) * v[:, :, None] * v[:, None, :]


_SKETCH: dict[tuple[int, int, torch.device], Tensor] = {}


def _sketch(n: int, rank: int, device: torch.device) -> Tensor:
    """A fixed Gaussian test matrix ``(N, rank)``: scores are deterministic, no RNG state used."""
    key = (n, rank, torch.device(device))
    if key not in _SKETCH:
        g = torch.Generator().manual_seed(0)
        with torch.inference_mode(False):  # kept across forwards: training ones too
            _SKETCH[key] = torch.randn(n, rank, generator=g).to(device)
    return _SKETCH[key]


def top_left_subspace(m: Tensor, rank: int, iters: int | None) -> Tensor:
    """Orthonormal basis ``(B, N, rank)`` of the top-``rank`` left singular subspace of ``m``.

    ``iters=None``: exact (``torch.linalg.svd``). Otherwise a randomised range finder followed
    by ``iters`` subspace-iteration steps ``Q ← orth(M Mᵀ Q)``, which converges to the exact
    subspace at the rate ``(σ_{r+1}/σ_r)^(2·iters)``.
    """
    rank = max(1, min(rank, m.shape[-1]))
    if iters is None:
        return torch.linalg.svd(m, full_matrices=False).U[..., :rank]
    q = torch.linalg.qr(m @ _sketch(m.shape[-1], rank, m.device)).Q
    for _ in range(iters):
        q = torch.linalg.qr(m @ (m.transpose(-1, -2) @ q)).Q
    return q


def svd_scores(attn: Tensor, valid: Tensor | None = None, rank: int = 4, iters: int | None = 2) -> Tensor:
    """``‖U_rᵀ A_HP[:, k]‖²`` for every token k ``(B, N)`` (see the module docstring)."""
    m = high_pass(attn, valid)
    u = top_left_subspace(m, rank, iters)
    return (u.transpose(-1, -2) @ m).square().sum(dim=1)
