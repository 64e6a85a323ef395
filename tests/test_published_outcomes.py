"""The published records still describe the code: each method's headline record in
``results/runs.jsonl`` (real DeiT-Tiny, MACs 0.65, no variant) regenerates with the same solved
knob and, on the first batch of its images, the same per-image predictions.

Why: a change to a reducer, to the ViT patch or to the MACs count (which moves a solved knob) can
move decisions without anyone rerunning the records, and the leaderboard would then show numbers
the code no longer produces. The speed work keeps eager decisions unchanged; this holds it to
that. By default on the harness's own first batch (``data.batch_size`` images from the start of
the sorted folder, so each image sees the same batch as in the published run); with
``FATR_RECORDS_ALL_IMAGES=1`` on every image of the record, batch by batch as the harness ran them
(``docs/results.md``, "Do the records still hold?").
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import REPO, VAL, one_config_per_reducer
from omegaconf import OmegaConf

from bench.store import read_records
from methods import apply_reducer, remove_reducer

pytestmark = pytest.mark.shared

RESULTS = REPO / "results"
HEADLINE_RATIO = 0.65


def headline_records() -> dict[str, dict]:
    """The latest record with per-image outcomes of every method at the headline budget, and of
    the unreduced model, on the real weights (no variant, not fine-tuned): the rows the README's
    table shows."""
    latest: dict[str, dict] = {}
    for r in read_records(RESULTS):
        cfg = r["config"]
        if (
            r["metrics"].get("outcomes_file")
            and (r["budget"].get("macs_ratio_target") == HEADLINE_RATIO or r["method"] == "none")
            and not r.get("variant")
            and not r.get("finetune")
            and not cfg["model"]["random_init"]
            and cfg["model"]["name"] == "deit_tiny_patch16_224"
        ):
            latest[r["method"]] = r
    return latest


RECORDS = headline_records()


def test_every_built_in_method_has_a_headline_record():
    """Otherwise the check below would quietly cover fewer methods than the leaderboard lists."""
    methods = set(one_config_per_reducer())
    assert methods <= set(RECORDS), f"no headline record for {sorted(methods - set(RECORDS))}"


@pytest.fixture(scope="module")
def record_images(deit_tiny):
    """The images the checks run on, decoded as the harness decodes them, with their ids as the
    outcome files name them, and the batch size the published runs used."""
    from bench.data import decode_image, eval_transform, list_images, load_imagenet_folder

    size = next(iter(RECORDS.values()))["config"]["data"]["batch_size"]
    if os.environ.get("FATR_RECORDS_ALL_IMAGES") == "1":
        ds = load_imagenet_folder(VAL, "deit_tiny_patch16_224", show_progress=False)
        images, paths = ds.images, ds.paths
    else:
        transform = eval_transform(deit_tiny)
        paths = [path for path, _ in list_images(VAL)[:size]]
        images = torch.stack([decode_image(path, transform) for path in paths])
    return images, [str(Path(p).relative_to(VAL)) for p in paths], size


@pytest.mark.parametrize("method", sorted(RECORDS))
def test_the_headline_record_regenerates(method, deit_tiny, record_images):
    from bench.budget import solve_budget
    from bench.job import build_reducer_from_config
    from bench.measure.accuracy import predict
    from bench.measure.outcomes import load_outcomes

    record = RECORDS[method]
    images, ids, batch_size = record_images
    published = load_outcomes(RESULTS, record["metrics"]["outcomes_file"])
    assert list(published.image_ids[: len(ids)]) == ids, "the record's images are not the folder's sorted images"
    cfg = record["config"]
    assert cfg["data"]["batch_size"] == batch_size, "records of several batch sizes: decode each one's first batch"
    reducer = build_reducer_from_config(OmegaConf.create(cfg["method"]))
    budget = cfg["budget"]
    if reducer.budget_knob is not None:
        reducer, solved = solve_budget(reducer, budget["macs_ratio"], budget["tolerance"], deit_tiny, method)
        assert solved["knob_value"] == record["budget"]["knob_value"], (
            f"{method}: the budget now solves to {solved['knob']}={solved['knob_value']}, the record has "
            f"{record['budget']['knob_value']} (rerun its records)"
        )
    remove_reducer(deit_tiny)
    apply_reducer(deit_tiny, reducer)
    try:
        top1 = predict(deit_tiny, images, batch_size=batch_size, show_progress=False).top1
    finally:
        remove_reducer(deit_tiny)
    recorded = published.pred[: len(ids)].tolist()
    moved = [i for i, (now, then) in enumerate(zip(top1.tolist(), recorded, strict=True)) if now != then]
    assert not moved, (
        f"{method}: {len(moved)} of {len(ids)} images now predict differently from the record "
        f"({record['git_commit'][:7]}), e.g. {ids[moved[0]]}: rerun its records"
    )
