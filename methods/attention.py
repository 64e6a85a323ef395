"""The attention variants every patched block runs: fused, fused and re-weighted, explicit.

Kept apart from :mod:`methods.patch` (as timm keeps ``layers/`` apart from ``models/``): the
patch decides *which* variant a block needs, this module computes it. All three give the same
numbers as timm's ``Attention.forward`` when no bias, re-weighting or tap is asked for.

Re-weighting (FATR's ω, :class:`AttentionReweight`) splits the attention map ``A`` into a
low-pass part ``A_LP = 11ᵀ/n`` (``n`` = valid tokens) and a high-pass part ``A_HP = A - A_LP``
and treats a contiguous *span* of columns (FATR's DC tokens) on its own::

    Â = A_LP' + (1 + hp_gain)·A_HP' + (1 + span_gain)·A^{span}

where ``'`` zeroes the span's columns and ``A^{span}`` keeps only them. Taking the span out of
the low/high split is the reading under which ``hp_gain = span_gain = 0`` gives exactly ``A``
(if ``A_HP`` kept the DC columns, the span term would count them twice). Rows are not
renormalised. ``Â·V`` is computed without materialising ``Â``::

    Â·V = (1 + g1)·(A·V) - (g1 / n)·Σ_{j ∉ span, valid} v_j + (g2 - g1)·A[:, span]·V[span]

and the few span columns ``A[:, span]`` come out of the same fused kernel by appending one-hot
value channels (with zero query/key channels, so the logits do not change).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.base import ATTN, CLS_ATTN, KEYS, VALUES, AttentionReweight


def ordinary_mean_weights(valid: Tensor | None, n: int, span: tuple[int, int], device: torch.device) -> Tensor:
    """``A_LP'`` as a (B|1, 1, 1, N) row: ``1/n`` on valid columns outside the span, else 0.

    ``n`` counts every valid token (span included): ``A_LP = 11ᵀ/n`` as the paper defines it,
    whose span columns the re-weighting then drops.
    """
    if valid is None:
        row = torch.ones(1, n, device=device)
    else:
        row = valid.float()
    count = row.sum(-1, keepdim=True)
    if span[1] > span[0]:
        row = row.clone()
        row[:, span[0] : span[1]] = 0
    return (row / count)[:, None, None, :]


def reweight_probs(probs: Tensor, rw: AttentionReweight, valid: Tensor | None) -> Tensor:
    """``Â`` from explicit probabilities ``(B, H, N, N)`` (the reference the fused path matches)."""
    n = probs.shape[-1]
    lp = ordinary_mean_weights(valid, n, rw.span, probs.device)
    g1 = rw.hp_gain.float()[None, :, None, None]
    out = (1 + g1) * probs - g1 * lp
    s0, s1 = rw.span
    if s1 > s0:
        g2 = 0.0 if rw.span_gain is None else rw.span_gain.float()[None, :, None, None]
        out = torch.cat([out[..., :s0], (1 + g2) * probs[..., s0:s1], out[..., s1:]], dim=-1)
    return out


def fused_reweighted(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    rw: AttentionReweight,
    valid: Tensor | None,
    scale: float,
    dropout_p: float = 0.0,
) -> Tensor:
    """``Â·V`` on the fused kernel; ``q, k, v`` are ``(B, H, N, D)``."""
    b, h, n, d = v.shape
    s0, s1 = rw.span
    span_n = rw.span_size
    if span_n:
        # One-hot value channels pick the span's attention out of the same kernel. Pad to a
        # multiple of 8 channels so GPU flash kernels accept the head size.
        extra = -(-span_n // 8) * 8
        onehot = v.new_zeros(n, extra)
        onehot[s0:s1, :span_n] = torch.eye(span_n, dtype=v.dtype, device=v.device)
        zeros = q.new_zeros(b, h, n, extra)
        out = F.scaled_dot_product_attention(
            torch.cat([q, zeros], -1),
            torch.cat([k, zeros], -1),
            torch.cat([v, onehot.expand(b, h, n, extra)], -1),
            attn_mask=bias,
            dropout_p=dropout_p,
            scale=scale,
        )
        out, span_attn = out[..., :d], out[..., d : d + span_n]
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    g1 = rw.hp_gain.to(v.dtype)[None, :, None, None]
    lp = ordinary_mean_weights(valid, n, rw.span, v.device).to(v.dtype)  # (B|1, 1, 1, N)
    mean_v = lp @ v  # (B, H, 1, D)
    result = (1 + g1) * out - g1 * mean_v
    if span_n:
        g2 = 0.0 if rw.span_gain is None else rw.span_gain.to(v.dtype)[None, :, None, None]
        result = result + (g2 - g1) * (span_attn @ v[:, :, s0:s1])
    return result


def class_token_logits(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """The class token's attention logits ``(q₀·scale) @ kᵀ`` (B, H, 1, N), from ``q`` and ``k``
    (B, H, N, D) as views of the qkv output.

    Every image's every head is one matrix-vector product of a batch. With more than one image
    the view's image and head strides do not merge, and ``matmul`` would copy ``kᵀ`` element by
    element into a fresh (B·H, D, N) tensor, most of the time of these logits. Copying ``k``'s
    rows as they lie instead halved it at batch 32 (2-core CPU, timed in alternation,
    2026-12-06), and the product then reads ``kᵀ`` in the layout it has at batch 1, where the
    heads alone are the batch and nothing is copied: from the same queries and keys each
    image's row is the bits it gets alone (tested; through the copied ``kᵀ`` it rounded
    differently in a batch; the linear layers before it still may). The full map's product
    ``q @ kᵀ``, a matrix product dominated by its arithmetic, gained nothing from the copy."""
    keys = k if k.shape[0] == 1 else k.contiguous()
    return (q[:, :, :1] * scale) @ keys.transpose(-2, -1)


def attention_forward(
    attn: nn.Module,
    x: Tensor,
    bias: Tensor | None,
    reweight: AttentionReweight | None,
    valid: Tensor | None,
    needs: frozenset[str],
) -> tuple[Tensor, dict[str, Tensor]]:
    """timm ``Attention.forward`` with an additive bias, a re-weighting and taps.

    Stays on ``F.scaled_dot_product_attention`` unless ``ATTN`` is needed. The ``ATTN`` tap is
    the softmax attention ``A`` itself (what the reducer scores), not the re-weighted ``Â``.
    """
    b, n, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    taps: dict[str, Tensor] = {}
    if KEYS in needs:
        taps[KEYS] = k
    if VALUES in needs:
        taps[VALUES] = v
    drop = attn.attn_drop.p if attn.training else 0.0
    if ATTN in needs:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        probs = logits.float().softmax(dim=-1)
        taps[ATTN] = probs
        if CLS_ATTN in needs:
            taps[CLS_ATTN] = probs[:, :, 0]
        weights = probs if reweight is None else reweight_probs(probs, reweight, valid)
        out = attn.attn_drop(weights.to(v.dtype)) @ v
    else:
        if reweight is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop)
        else:
            out = fused_reweighted(q, k, v, bias, reweight, valid, attn.scale, drop)
        if CLS_ATTN in needs:
            logits0 = class_token_logits(q, k, attn.scale)
            if bias is not None:
                logits0 = logits0 + bias
            taps[CLS_ATTN] = logits0.float().softmax(dim=-1)[:, :, 0]
    out = out.transpose(1, 2).reshape(b, n, h * d)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), taps
