"""Per-image outcomes of one accuracy job, stored next to its record.

A record's top-1 is one number; comparing two runs honestly needs to know *which* images each
got right (a paired test), so every accuracy job also writes one small ``.npz`` under
``<results_dir>/preds/`` and names it, relative to ``results_dir``, in its metrics
(``outcomes_file``). Any two runs on the same images can then be compared after the fact
(``python -m bench.compare``). The file is written whole under a temporary name and renamed,
so an interrupted job leaves no half file; a write that fails (a full disk) removes the
temporary file and fails the job with one line.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.data import ImageSet
from bench.errors import BenchError
from bench.measure.predictions import Predictions
from bench.results_io import write_failure

OUTCOMES_DIR = "preds"
FIELDS = ("image_ids", "pred", "label", "correct", "agree", "top5_hit")


@dataclass
class Outcomes:
    """One entry per evaluated image, in the order the images were evaluated."""

    image_ids: np.ndarray
    """Path of each image relative to the data root (``<wnid>/<file>``)."""
    pred: np.ndarray
    """Top-1 predicted class."""
    label: np.ndarray
    correct: np.ndarray
    """Top-1 equals the label."""
    agree: np.ndarray
    """Top-1 equals the unreduced model's top-1 (all true for the unreduced model itself)."""
    top5_hit: np.ndarray
    """The label is among the top-5 predictions."""

    def __len__(self) -> int:
        return len(self.image_ids)

    def same_images(self, other: Outcomes) -> bool:
        return len(self) == len(other) and bool(np.array_equal(self.image_ids, other.image_ids))


def outcomes_of(preds: Predictions | None, data: ImageSet, reference: Predictions | None) -> Outcomes | None:
    """Outcomes of ``preds`` on ``data``; ``reference`` is the unreduced model's predictions
    (None for the unreduced model itself)."""
    if preds is None:
        return None
    labels = data.labels.cpu()
    top1 = preds.top1.cpu()
    agree = (top1 == reference.top1.cpu()) if reference is not None else np.ones(len(top1), bool)
    return Outcomes(
        image_ids=np.array([os.path.relpath(p, data.root) for p in data.paths], dtype=str),
        pred=top1.numpy().astype(np.int16),
        label=labels.numpy().astype(np.int16),
        correct=(top1 == labels).numpy(),
        agree=np.asarray(agree, dtype=bool),
        top5_hit=(preds.top5.cpu() == labels[:, None]).any(dim=1).numpy(),
    )


def save_outcomes(results_dir: str | Path, stem: str, outcomes: Outcomes) -> str:
    """Write ``preds/<stem>-<unique>.npz`` atomically; returns its path relative to ``results_dir``.

    Raises one-line :class:`BenchError` (``disk full: ...`` when space ran out) if it cannot
    be written whole; nothing is left behind then, not even the temporary file."""
    folder = Path(results_dir) / OUTCOMES_DIR
    name = f"{stem}-{uuid.uuid4().hex[:8]}.npz"
    tmp = folder / f".{name}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **{k: getattr(outcomes, k) for k in FIELDS})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / name)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise write_failure("could not write per-image outcomes", folder / name, e) from None
    return f"{OUTCOMES_DIR}/{name}"


def load_outcomes(results_dir: str | Path, relative_path: str) -> Outcomes:
    path = Path(results_dir) / relative_path
    try:
        with np.load(path, allow_pickle=False) as z:
            return Outcomes(**{k: z[k] for k in FIELDS})
    except FileNotFoundError:
        raise BenchError(f"per-image outcomes file missing: {path}") from None
    except (OSError, ValueError, KeyError) as e:
        raise BenchError(f"cannot read per-image outcomes {path}: {e}") from None
