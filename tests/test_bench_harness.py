"""Benchmark (pytest-benchmark): the harness's own cost, the README's 3-method sweep
(fatr, tome, evit, every measurement on) on six images and a randomly initialised DeiT-Tiny,
so that what the harness spends around the models is tracked from commit to commit.

``cold``: an empty results folder, as a first sweep has (the unreduced model measured);
``warm``: the measurement cache of a previous sweep in place. Each round starts as a new
process would (no weights, images or unreduced baseline held in memory). Run with
``pytest --benchmark-only``; compare within one run: the machines are shared and noisy.
"""

from __future__ import annotations

import shutil

import pytest
from bench_utils import FAST, compose, image_folder

METHODS = ("fatr", "tome", "evit")


def _new_process() -> None:
    """Forget what one process keeps between the jobs of a sweep."""
    from bench import data, job, models
    from bench.measure import spectral

    for memo in (job._BASELINES, spectral._REFERENCE, data._CACHE, models._CACHE):
        memo.clear()


@pytest.mark.benchmark(group="harness: 3-method sweep, 6 images")
@pytest.mark.parametrize("cache", ["cold", "warm"])
def test_three_method_sweep(benchmark, tmp_path, cache):
    from bench.job import run_job
    from bench.store import read_records

    root = image_folder(tmp_path / "val")
    results = tmp_path / "results"
    configs = [compose([f"method={m}", f"data.root={root}", f"results_dir={results}", *FAST]) for m in METHODS]

    def sweep() -> None:
        _new_process()
        for cfg in configs:
            run_job(cfg)

    def setup() -> None:
        if cache == "cold":
            shutil.rmtree(results, ignore_errors=True)

    if cache == "warm":
        sweep()  # a first sweep fills the measurement cache
    benchmark.pedantic(sweep, setup=setup, rounds=3, iterations=1)
    _new_process()
    records = read_records(results)
    assert [r["method"] for r in records[-4:]] == ["none", *METHODS]
    if cache == "warm":
        assert records[-4]["metrics"]["from_cache"] == ["flops", "predictions"]  # it measured what it says
