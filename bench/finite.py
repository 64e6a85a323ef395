"""NaN and Inf refused where they enter: in the weights, and in the output of a measured forward.

A NaN logit still has an ``argmax`` (index 0), so a broken checkpoint would score top-1 0% and
agree 100% with an equally broken unreduced model instead of failing.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from bench.errors import BenchError


def check_finite_weights(tensors: Iterable[tuple[str, Tensor]], source: str) -> None:
    """Raise naming the first tensor with a NaN or Inf (and how many such tensors there are)."""
    bad = [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise BenchError(f"{source} has NaN or Inf weights in {bad[0]}{more}; refusing to measure a broken model")


def check_finite_output(out: Tensor, what: str) -> None:
    """Raise when a forward produced NaN or Inf (cheap next to the forward itself)."""
    if isinstance(out, Tensor) and out.is_floating_point() and not bool(torch.isfinite(out).all()):
        raise BenchError(f"{what}: the model produced NaN or Inf outputs; refusing to record numbers from it")
