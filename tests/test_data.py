"""ImageNet folder loading: labels through the synset list, and clear errors for bad folders."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from bench.data import list_images, load_imagenet_folder, spread, synsets
from bench.errors import BenchError


def _write(root, wnid, name, color=(120, 30, 200)):
    d = root / wnid
    d.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), color).save(d / name)


def test_partial_folder_is_labelled_through_the_synset_list(tmp_path):
    names = synsets()
    # Only two classes present, far apart in the synset list.
    _write(tmp_path, names[7], "a.JPEG")
    _write(tmp_path, names[981], "b.JPEG")
    _write(tmp_path, names[981], "c.JPEG")
    items = list_images(tmp_path)
    assert [label for _, label in items] == [7, 981, 981]
    ds = load_imagenet_folder(tmp_path, "deit_tiny_patch16_224", show_progress=False)
    assert ds.images.shape == (3, 3, 224, 224)
    assert ds.labels.tolist() == [7, 981, 981]


@pytest.mark.parametrize(
    "setup,match",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: p, "is empty"),
        (lambda p: (Image.new("RGB", (8, 8)).save(p / "x.JPEG"), p)[1], "holds 1 images directly"),
        (lambda p: ((p / "cats").mkdir(), p)[1], "not an ImageNet-1k synset id"),
        (lambda p: ((p / "n01440764").mkdir(), p)[1], "no images"),
    ],
)
def test_bad_folders_give_one_line_errors(tmp_path, setup, match):
    with pytest.raises(BenchError, match=match):
        list_images(setup(tmp_path))


def test_limit_spreads_deterministically():
    assert spread(10, 3) == [0, 3, 6]
    assert spread(4, None) == [0, 1, 2, 3]
    with pytest.raises(BenchError):
        spread(4, 0)


def test_decoded_once_per_process(tmp_path):
    _write(tmp_path, synsets()[0], "a.JPEG")
    a = load_imagenet_folder(tmp_path, "deit_tiny_patch16_224", show_progress=False)
    b = load_imagenet_folder(tmp_path, "deit_tiny_patch16_224", show_progress=False)
    assert a is b and torch.equal(a.images, b.images)
