"""oneDNN linear layers with prepacked weights, for the CPU forwards whose outputs are measured.

PyTorch runs an fp32 ``nn.Linear`` on the CPU through MKL's sgemm. On the project's 2-core AMD
EPYC that reached 70-85 GMAC/s on DeiT-Tiny's shapes (19 700 tokens x 192 -> 576/192/768,
768 -> 192), where oneDNN's linear with the weight reordered once into its blocked layout reached
95-105 GMAC/s, and a whole batch-100 forward took 1.56 s instead of 1.72 s (measured 2026-11-26).
It is how ``torch.compile``'s CPU backend runs a frozen linear, without compiling anything.

Only the accuracy pass uses it: what it measures is which classes the model ranks first, and
the GEMM's blocking moves the logits by float rounding at most (DeiT-Tiny's 192-wide products
come out bit-identical, the 768-wide ones within 1e-5), so on the real weights and the 1300 val
images every top-1, top-5 and agreement value of the unreduced, FATR, ToMe and EViT models came
out equal to the published ones. The spectral pass keeps PyTorch's kernels: its per-image
log-amplitudes moved by 7e-5 (relative) with oneDNN, for a tenth of a second per model, so it
reproduces the published values exactly instead. Latency keeps them too, because a latency
figure is what a user's unmodified model gets.

Set ``FATR_LINEAR=default`` to keep PyTorch's kernels everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

_CHECK_ROWS = 4  # rows of a random input on which each packed layer must match nn.Linear


def packed_linear_kernels(device: torch.device | str) -> str:
    """What the measured (non-timed) forwards on ``device`` use, for the record."""
    if os.environ.get("FATR_LINEAR", "").strip().lower() == "default":
        return "default (FATR_LINEAR=default)"
    if torch.device(device).type != "cpu":
        return "default (not the CPU)"
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return "default (no oneDNN linear in this PyTorch)"
    return "oneDNN, prepacked weights (accuracy pass)"


@contextmanager
def prepacked_linears(model: nn.Module, device: torch.device | str) -> Iterator[int]:
    """Run the plain ``nn.Linear`` layers of ``model`` through oneDNN with prepacked weights
    inside the block (CPU, fp32, no autograd; anything else takes the layer's own forward).
    Yields how many layers were switched: 0 where :func:`packed_linear_kernels` says default,
    or where a layer's packed output does not match its own on a random input.

    The weights are packed on entry, so they must not change inside the block.
    """
    if not packed_linear_kernels(device).startswith("oneDNN"):
        yield 0
        return
    switched: list[nn.Linear] = []
    try:
        with torch.no_grad():
            for layer in model.modules():
                packed = _packed_forward(layer) if _packable(layer) else None
                if packed is not None:
                    layer.forward = packed
                    switched.append(layer)
        yield len(switched)
    finally:
        for layer in switched:
            del layer.forward


def _packable(layer: nn.Module) -> bool:
    """A plain fp32 ``nn.Linear`` on the CPU (subclasses may change what forward means)."""
    w = getattr(layer, "weight", None)
    return type(layer) is nn.Linear and w is not None and w.dtype == torch.float32 and w.device.type == "cpu"


def _packed_forward(layer: nn.Linear) -> Callable[[Tensor], Tensor] | None:
    weight = layer.weight.detach()
    bias = None if layer.bias is None else layer.bias.detach()
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        probe = torch.randn(_CHECK_ROWS, layer.in_features, generator=torch.Generator().manual_seed(0))
        got = torch.ops.mkldnn._linear_pointwise(probe, packed, bias, "none", [], "")
    except RuntimeError:
        return None
    if not torch.allclose(got, nn.functional.linear(probe, weight, bias), rtol=1e-4, atol=1e-5):
        return None
    own = layer.forward

    def forward(x: Tensor) -> Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled() or x.dim() < 2:
            return own(x)
        if torch.is_autocast_enabled("cpu"):
            return own(x)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")

    return forward
