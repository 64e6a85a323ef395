"""Training images for fine-tuning: the folder, the guard against evaluation images, and
augmentation seeded per image.

Each image's augmentation is seeded from ``(seed, epoch, index)`` and the images of a step are
a fixed slice of a seeded stream of epochs, so a run sees the same batches whatever the number
of processes, data-loader workers or interruptions: resumed and distributed runs can be
compared with an uninterrupted single-process run.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from bench.data import IMAGE_SUFFIXES, WNID, list_images, oversized_image, spread, synsets
from bench.errors import BenchError


@dataclass(frozen=True)
class TrainImages:
    """Image files with their class index (-1 where the folder is not an ImageNet wnid)."""

    paths: list[Path]
    labels: list[int]
    root: str

    def __len__(self) -> int:
        return len(self.paths)


def list_train_images(root: str | Path | None, need_labels: bool, limit: int | None = None) -> TrainImages:
    """Every image under ``root`` (any depth), sorted; labelled by its parent folder's wnid.

    ``need_labels`` (losses with a cross-entropy term) requires the ``<wnid>/<file>`` layout.
    """
    if not root:
        raise BenchError("no training folder: set data.train_root=PATH (or FATR_TRAIN_ROOT)")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise BenchError(f"data.train_root is not a folder: {path} (set data.train_root=PATH or FATR_TRAIN_ROOT)")
    files = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise BenchError(f"training folder {path} holds no images (.JPEG/.jpg/.png)")
    index = {w: i for i, w in enumerate(synsets())}
    labels = [index.get(f.parent.name, -1) if WNID.match(f.parent.name) else -1 for f in files]
    if need_labels and min(labels) < 0:
        bad = files[labels.index(-1)]
        raise BenchError(
            f"loss needs labels but {bad.relative_to(path)} in {path} is not under an ImageNet wnid folder "
            "(<wnid>/<file>.JPEG, e.g. n01440764/x.JPEG); use loss=kd to train from the teacher alone"
        )
    keep = spread(len(files), limit, "data.train_limit")
    return TrainImages([files[i] for i in keep], [labels[i] for i in keep], str(path))


def check_disjoint(train_root: str | Path, eval_root: str | Path) -> None:
    """Refuse to train on the evaluation images: the same folder, or any shared file name.

    The evaluation folder must be a valid one (the run ends by evaluating on it), so it is
    listed here, before any training.
    """
    train, ev = Path(train_root).expanduser().resolve(), Path(eval_root).expanduser().resolve()
    if train == ev:
        raise BenchError(f"training folder {train} is the evaluation folder data.root: never train on eval images")
    if ev in train.parents or train in ev.parents:
        raise BenchError(f"training folder {train} and evaluation folder {ev} contain one another")
    eval_names = {p.name for p, _ in list_images(ev)}
    shared = sorted(f.name for f in train.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.name in eval_names)
    if shared:
        raise BenchError(
            f"training folder {train} shares {len(shared)} images with the evaluation folder {ev} "
            f"(e.g. {shared[0]}): never train on eval images"
        )


# -- augmentation --------------------------------------------------------------------------------


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize for Pillow >= 13, which refuses 0 bits: 0 bits keeps nothing, i.e. a
    black image, exactly what older Pillow (and the DeiT recipe's original runs) produced."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    from PIL import ImageOps

    return ImageOps.posterize(img, bits_to_keep)


def _fix_posterize(transform) -> None:
    """RandAugment's ``PosterizeIncreasing`` asks for 0 bits at magnitude 10 (m9 + noise)."""
    from timm.data import auto_augment

    stack = [transform]
    while stack:
        t = stack.pop()
        if isinstance(t, auto_augment.AugmentOp):
            if t.aug_fn is auto_augment.posterize:
                t.aug_fn = _posterize
            continue
        for attr in ("transforms", "ops", "policy"):
            children = getattr(t, attr, None)
            if isinstance(children, (list, tuple)):
                stack.extend(c for c in children if not isinstance(c, (str, int, float)))


def train_transform(model: nn.Module, augment: bool = True, auto_augment: str | None = None, re_prob: float = 0.0):
    """timm's training transform at the model's input size and normalisation (or its eval
    transform when ``augment`` is false, e.g. to fit a few reducer parameters)."""
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    cfg["input_size"] = (3, *model.patch_embed.img_size)
    if not augment:
        return timm.data.create_transform(**cfg, is_training=False)
    for key in ("crop_pct", "crop_mode"):  # eval-only settings
        cfg.pop(key, None)
    transform = timm.data.create_transform(**cfg, is_training=True, auto_augment=auto_augment, re_prob=re_prob)
    _fix_posterize(transform)
    return transform


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007_009 + index) % (2**31)


class SeededImages(torch.utils.data.Dataset):
    """Decoded, augmented images addressed by ``(epoch, index)``; the augmentation of each one
    is drawn from its own seed and leaves the caller's random generators untouched."""

    def __init__(self, images: TrainImages, transform, seed: int) -> None:
        self.images = images
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        epoch, index = key
        path = self.images.paths[index]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise oversized_image(path, e) from None
        except OSError as e:
            raise BenchError(f"cannot read image {path}: {e}") from None
        s = sample_seed(self.seed, epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(s)
            np.random.seed(s)
            torch.manual_seed(s)
            try:
                x = self.transform(img)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
        return x, self.images.labels[index]


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(sample_seed(seed, epoch, 0) + 1))


class StepBatches(torch.utils.data.Sampler):
    """This process's micro-batches of ``(epoch, index)`` keys, from ``start_step`` on.

    The data is a stream of shuffled epochs; optimizer step ``s`` reads positions
    ``[s * batch, (s + 1) * batch)`` of it (so a global batch larger than the folder simply
    spans epochs). Within a step, micro-batch ``k`` of rank ``r`` reads the slice
    ``(k * world + r) * micro``: the global batch is the same for any split.
    """

    def __init__(
        self, n: int, batch: int, micro: int, world: int, rank: int, seed: int, start_step: int, steps: int
    ) -> None:
        if batch % (micro * world):
            raise BenchError(f"global batch {batch} is not a multiple of micro_batch {micro} x {world} processes")
        self.n, self.batch, self.micro, self.world, self.rank = n, batch, micro, world, rank
        self.seed, self.start_step, self.steps = seed, start_step, steps
        self.accum = batch // (micro * world)
        self._orders: dict[int, Tensor] = {}

    def _key(self, position: int) -> tuple[int, int]:
        epoch, slot = divmod(position, self.n)
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.n, self.seed, epoch)}
        return epoch, int(self._orders[epoch][slot])

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.accum

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.steps):
            for k in range(self.accum):
                first = step * self.batch + (k * self.world + self.rank) * self.micro
                yield [self._key(p) for p in range(first, first + self.micro)]
