"""How much each token contributes to the high-frequency part of attention.

With ``A = A_LP + A_HP`` and ``A_LP = 11ᵀ/n`` (the DC filter), a token whose attention column
deviates from uniform feeds high frequencies into the block's output. The paper scores tokens
by the column mean of ``A_HP``; since ``mean_q(A[q,k] - 1/n)`` is a constant shift of the mean
attention a token receives, the ``signed`` score ranks like plain attention received. ``abs``
and ``std`` are the alternatives the description leaves open: ``std`` is the exact size of
token k's contribution to ``H_f`` of the attention output, ``‖(I - 11ᵀ/n) A[:, k]‖``.
"""

from __future__ import annotations

from torch import Tensor

SCORES = ("signed", "abs", "std")


def hf_scores(attn: Tensor, variant: str = "signed", valid: Tensor | None = None) -> Tensor:
    """Score every token (column) of ``attn`` (B, H, N, N); higher = more high-frequency.

    ``valid`` (B, N) marks real tokens: empty DC slots (size 0) are neither counted as
    queries nor in ``n``. Heads are averaged; queries are averaged (``signed``, ``abs``) or
    reduced by the Euclidean norm (``std``).
    """
    if variant not in SCORES:
        raise ValueError(f"unknown FATR score {variant!r}; choose one of {', '.join(SCORES)}")
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
