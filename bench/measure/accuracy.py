"""Top-1, top-5 and agreement with the unreduced model, on the same images."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bench.finite import check_finite_output
from bench.measure.packed_linear import packed_linear_kernels, prepacked_linears
from bench.measure.predictions import Predictions
from bench.measure.shared_prefix import BlockInputs, SharedPrefix, keeping_block_inputs

if TYPE_CHECKING:
    from bench.measure.cache import MeasurementCache
    from bench.measure.subject import Measured, Subject


def predict(
    model: nn.Module,
    images: Tensor,
    batch_size: int = 100,
    device: torch.device | str = "cpu",
    desc: str = "accuracy",
    show_progress: bool = True,
    keep_block: int | None = None,
    start: BlockInputs | None = None,
) -> Predictions:
    """Top-5 predictions for every image (fp32, eval mode, no grad; on the CPU with prepacked
    linear layers, see :mod:`bench.measure.packed_linear`).

    ``keep_block``: also keep the tokens entering that block (``Predictions.block_inputs``).
    ``start``: such tokens of the unreduced model, where this reduced model's pass may start
    (checked on the first batch, see :mod:`bench.measure.shared_prefix`)."""
    model.eval().to(device)
    out = []
    forward = SharedPrefix(model, start, images)
    with torch.no_grad(), prepacked_linears(model, device), keeping_block_inputs(model, keep_block, images) as kept:
        for i in tqdm(range(0, len(images), batch_size), desc=desc, disable=not show_progress, leave=False):
            batch = images[i : i + batch_size].to(device, non_blocking=True)
            logits = forward(batch, i)
            check_finite_output(logits, f"{desc}, images {i}..{i + len(logits) - 1}")
            out.append(logits.topk(5, dim=-1).indices.cpu())
    return Predictions(torch.cat(out), kept[0] if kept else None, forward.outcome)


def accuracy_metrics(preds: Predictions, labels: Tensor, reference: Predictions | None = None) -> dict[str, float]:
    """Percentages. ``agreement``: how often the top-1 equals the reference model's top-1."""
    if (labels < 0).any():
        raise ValueError("accuracy needs labelled images (labels >= 0)")
    m = {
        "top1": 100.0 * (preds.top1 == labels).float().mean().item(),
        "top5": 100.0 * (preds.top5 == labels[:, None]).any(dim=1).float().mean().item(),
        "num_images": int(len(labels)),
    }
    if reference is not None:
        m["agreement"] = 100.0 * (preds.top1 == reference.top1).float().mean().item()
    return m


def cached_predictions(
    cache: MeasurementCache,
    model: nn.Module,
    images: Tensor,
    batch_size: int,
    device: torch.device,
    progress: bool,
    keep_block: int | None = None,
) -> Predictions:
    """The unreduced model's predictions, from the measurement cache or measured (and stored;
    only then with the tokens entering ``keep_block``, see :func:`predict`)."""
    fresh: list[Predictions] = []

    def compute() -> dict[str, Any]:
        fresh.append(predict(model, images, batch_size, device, "unreduced", progress, keep_block=keep_block))
        return {"top5": fresh[0].top5}

    settings = {"batch_size": batch_size, "linear_kernels": packed_linear_kernels(device)}
    stored, _ = cache.get_or_compute("predictions", settings, compute)
    return fresh[0] if fresh else Predictions(stored["top5"])


def accuracy_job(enabled: bool, subject: Subject, out: Measured) -> None:
    """Top-1, top-5 and, for a reduced model, agreement and Δ top-1 against the reference
    (``bench.accuracy``); the unreduced model's predictions come from the cache when it has them."""
    s = subject
    t0 = time.perf_counter()
    if not s.reduced and s.cache is not None:
        out.preds = cached_predictions(
            s.cache, s.model, s.data.images, s.batch_size, s.device, s.progress, s.keep_block
        )
    elif not s.reduced:
        out.preds = predict(s.model, s.data.images, s.batch_size, s.device, s.name, s.progress, s.keep_block)
    else:
        start = s.base.preds.block_inputs if s.base.preds is not None else None
        out.preds = predict(s.model, s.data.images, s.batch_size, s.device, s.name, s.progress, start=start)
    m = out.metrics
    m["accuracy_seconds"] = time.perf_counter() - t0
    if s.reduced:
        m["accuracy_shared_prefix"] = out.preds.shared
    m.update(accuracy_metrics(out.preds, s.data.labels, s.base.preds if s.base else None))
    if s.base is not None:
        m["baseline_top1"] = s.base.metrics["top1"]
        m["delta_top1"] = m["top1"] - s.base.metrics["top1"]
