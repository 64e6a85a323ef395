"""ImageNet validation folders: labels through the 1000-synset list, decoded once per process.

A folder with only some classes must still get the right labels, so a class index is the
position of the folder's wnid in timm's sorted list of the 1000 ImageNet-1k synsets, never the
position of the folder among those present.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

from bench.errors import BenchError

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
WNID = re.compile(r"^n\d{8}$")
_CACHE: dict[tuple, ImageSet] = {}


@dataclass
class ImageSet:
    """Preprocessed images ``(N, 3, H, W)``, their labels ``(N,)`` and where they came from."""

    images: Tensor
    labels: Tensor
    paths: list[str]
    root: str

    def __len__(self) -> int:
        return len(self.paths)


def synsets() -> list[str]:
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


def list_images(root: str | Path, require_known_classes: bool = True) -> list[tuple[Path, int]]:
    """``(path, class index)`` of every image under ``root/<wnid>/``, sorted by path.

    Labels are looked up in the 1000-synset list. With ``require_known_classes=False`` (image
    folders used without labels, such as calibration sets) unknown folder names get label -1.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise BenchError(f"data.root does not exist: {root} (set data.root=PATH or FATR_DATA_ROOT)")
    if not root.is_dir():
        raise BenchError(f"data.root is not a folder: {root}")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not subdirs:
        if loose:
            raise BenchError(
                f"data.root {root} holds {len(loose)} images directly; expected the ImageNet val layout "
                "<wnid>/<file>.JPEG (one folder per class)"
            )
        raise BenchError(f"data.root {root} is empty: expected the ImageNet val layout <wnid>/<file>.JPEG")
    index = {w: i for i, w in enumerate(synsets())}
    items: list[tuple[Path, int]] = []
    for d in subdirs:
        if d.name not in index:
            if require_known_classes:
                raise BenchError(
                    f"folder {d.name!r} in {root} is not an ImageNet-1k synset id (like n01440764); "
                    "expected the ImageNet val layout <wnid>/<file>.JPEG"
                )
            label = -1
        else:
            label = index[d.name]
        items += [(f, label) for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise BenchError(f"no images (.JPEG/.jpg/.png) found under {root}/<wnid>/")
    return items


def spread(n_total: int, limit: int | None, key: str = "data.limit") -> list[int]:
    """Indices of an evenly spaced, deterministic subset, so quick runs still span the classes
    (``key``: the setting ``limit`` came from, for the error)."""
    if limit is None or limit >= n_total:
        return list(range(n_total))
    if limit <= 0:
        raise BenchError(f"{key} must be positive, got {limit}")
    return [i * n_total // limit for i in range(limit)]


def to_rgb(im: Image.Image, path: str | Path = "") -> Image.Image:
    """8-bit RGB. 16-bit grayscale (PIL modes ``I;16*``, and ``I`` as older Pillow opens such
    PNGs) is scaled to 8 bits: PIL's own ``convert`` clips it, which turns the image white."""
    if im.mode.startswith("I;16") or im.mode == "I":
        import numpy as np

        a = np.asarray(im).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise BenchError(f"cannot read image {path}: mode {im.mode} values outside 0..65535 (not a 16-bit image)")
        return Image.fromarray(((a + 128) // 257).astype(np.uint8)).convert("RGB")
    if im.mode == "F":
        raise BenchError(f"cannot read image {path}: floating-point images (PIL mode F) are not supported")
    return im.convert("RGB")


_BOMB = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+) pixels")


def oversized_image(path: str | Path, error: Exception) -> BenchError:
    """One line for an image Pillow refuses to open as a possible decompression bomb (over
    ``PIL.Image.MAX_IMAGE_PIXELS``, or twice that as an error): which file, how large, the
    limit and what to do, instead of an unexpected DecompressionBombError reported as a bug."""
    found = _BOMB.search(str(error))
    size = f"{int(found[1]):,} pixels, over Pillow's limit of {int(found[2]):,}" if found else str(error)
    return BenchError(
        f"image {path} is too large to decode ({size}; PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS:,}): "
        "resize it or remove it from the folder"
    )


def eval_transform(model: nn.Module, img_size: int | None = None):
    """The model's own timm eval transform (resize, centre crop, normalise)."""
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    if img_size is not None:
        cfg["input_size"] = (3, img_size, img_size)
    return timm.data.create_transform(**cfg, is_training=False)


def decode_image(path: str | Path, transform: Callable[[Image.Image], Tensor]) -> Tensor:
    """One image as the harness evaluates it: decoded, converted to RGB and put through the
    model's ``transform``; an unreadable or oversized file is one :class:`BenchError`."""
    try:
        with Image.open(path) as im:
            return transform(to_rgb(im, path))
    except OSError as e:
        raise BenchError(f"cannot read image {path}: {e}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise oversized_image(path, e) from None


def load_imagenet_folder(
    root: str | Path,
    model: nn.Module | str,
    limit: int | None = None,
    img_size: int | None = None,
    show_progress: bool = True,
    require_known_classes: bool = True,
) -> ImageSet:
    """Decode and preprocess the folder once per process; later calls reuse the tensors."""
    if isinstance(model, str):
        from bench.models import create_model

        model = create_model(model)
    transform = eval_transform(model, img_size)
    key = (str(Path(root).expanduser().resolve()), limit, repr(transform), require_known_classes)
    if key in _CACHE:
        return _CACHE[key]
    items = list_images(root, require_known_classes)
    items = [items[i] for i in spread(len(items), limit)]

    def decode(item: tuple[Path, int]) -> Tensor:
        return decode_image(item[0], transform)

    # PIL decodes and resizes without the GIL, so threads use every core; in worker threads the
    # small per-image torch ops (to tensor, normalise) also stay off the intra-op thread pool,
    # which on a loaded machine made the serial loop 10-20x slower. Same tensors, same order.
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        decoded = pool.map(decode, items)
        desc = f"decoding {Path(root).name}"
        tensors = list(tqdm(decoded, total=len(items), desc=desc, disable=not show_progress, leave=False))
    ds = ImageSet(
        images=torch.stack(tensors),
        labels=torch.tensor([label for _, label in items]),
        paths=[str(p) for p, _ in items],
        root=str(root),
    )
    _CACHE[key] = ds
    return ds
