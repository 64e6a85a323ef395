"""The ``finetune`` group's settings, checked before anything loads or trains.

The group has no typed schema (a recipe file may add keys of its own), so a value of the wrong
type reached the arithmetic that builds the recipe: ``finetune.lr=abc`` ended in a
``ValueError`` traceback and ``finetune.batch_size=0`` in a ``ZeroDivisionError``. Each key the
job reads is checked here for its type and range, the first bad one refused in one line that
names it (:class:`~bench.errors.BenchError`: ``error:`` and exit status 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from bench.errors import BenchError


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _positive_int(v: Any) -> bool:
    return _is_int(v) and v >= 1


def _count(v: Any) -> bool:
    return _is_int(v) and v >= 0


def _positive(v: Any) -> bool:
    return _is_number(v) and v > 0


def _non_negative(v: Any) -> bool:
    return _is_number(v) and v >= 0


def _fraction(v: Any) -> bool:
    return _is_number(v) and 0 <= v <= 1


def _below_one(v: Any) -> bool:
    return _is_number(v) and 0 <= v < 1


def _open_unit(v: Any) -> bool:
    return _is_number(v) and 0 < v < 1


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "images": (_optional(_positive_int), "an integer >= 1 or null"),
    "epochs": (_optional(_positive), "a positive number (or set finetune.images)"),
    "batch_size": (_positive_int, "an integer >= 1"),
    "micro_batch": (_positive_int, "an integer >= 1"),
    "lr": (_positive, "a positive number"),
    "weight_decay": (_non_negative, "a number >= 0"),
    "min_lr": (_non_negative, "a number >= 0"),
    "warmup_epochs": (_non_negative, "a number >= 0"),
    "drop_path": (_below_one, "a number in [0, 1)"),
    "ema_decay": (_optional(_open_unit), "a number in (0, 1) or null"),
    "eval_ema": (_bool, "true or false"),
    "kd_weight": (_fraction, "a number in [0, 1]"),
    "temperature": (_positive, "a positive number"),
    "label_smoothing": (_below_one, "a number in [0, 1)"),
    "clip_grad": (_optional(_positive), "a positive number or null"),
    "amp": (_bool, "true or false"),
    "augment": (_bool, "true or false"),
    "re_prob": (_fraction, "a number in [0, 1]"),
    "checkpoint_every": (_positive_int, "an integer >= 1"),
    "num_workers": (_count, "an integer >= 0"),
}
"""Each key the job reads: its check and what it must be, for the message."""


def check_finetune_settings(recipe: Mapping[str, Any]) -> None:
    """Raise :class:`BenchError` for the first ``finetune.<key>`` whose value the job cannot
    use; keys a recipe file adds of its own pass untouched."""
    for key, (ok, what) in CHECKS.items():
        if key in recipe and not ok(recipe[key]):
            raise BenchError(f"finetune.{key} must be {what}, got {recipe[key]!r}")
    if recipe.get("images") is None and recipe.get("epochs") is None:
        raise BenchError("finetune.epochs and finetune.images are both null: set one of them")
