"""Fine-tuning losses: labels, the unreduced teacher's predictions, or both (the paper's)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from bench.errors import BenchError

LOSSES = ("ce_kd", "kd", "ce")


def needs_labels(kind: str) -> bool:
    check_loss(kind)
    return kind != "kd"


def check_loss(kind: str) -> None:
    if kind not in LOSSES:
        raise BenchError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")


def distillation(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL(teacher ‖ student) on temperature-softened predictions, × T² (Hinton et al.) so its
    gradient keeps the same scale at any temperature; mean over images.

    In float64: with identical predictions (the unreduced control) the float32 gradient is
    round-off of ~1e-8, which Adam normalises into steps as large as the learning rate; in
    float64 it is ~1e-16 and the control stays where it started, as it should.
    """
    t = float(temperature)
    log_p = F.log_softmax(student.double() / t, dim=-1)
    log_q = F.log_softmax(teacher.double() / t, dim=-1)
    return (F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * t * t).float()


def finetune_loss(
    kind: str,
    student: Tensor,
    labels: Tensor,
    teacher: Tensor | None,
    kd_weight: float = 0.5,
    temperature: float = 1.0,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss to minimise and its detached parts (``ce``, ``kd``) for the log.

    ``ce_kd`` = (1 − kd_weight) · CE(labels) + kd_weight · KD(teacher); ``kd`` needs no labels.
    """
    check_loss(kind)
    parts: dict[str, Tensor] = {}
    if kind in ("ce", "ce_kd"):
        parts["ce"] = F.cross_entropy(student.float(), labels, label_smoothing=label_smoothing)
    if kind in ("kd", "ce_kd"):
        if teacher is None:
            raise BenchError(f"loss={kind} needs the teacher's logits")
        parts["kd"] = distillation(student, teacher, temperature)
    if kind == "ce_kd":
        loss = (1 - kd_weight) * parts["ce"] + kd_weight * parts["kd"]
    else:
        loss = parts[kind]
    return loss, {k: v.detach() for k, v in parts.items()}
