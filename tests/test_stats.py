"""The leaderboard's statistics on constructed outcomes where the answer is known."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from bench.report.stats import (
    Bootstrap,
    bootstrap_for,
    detectable_delta,
    detectable_table,
    discordance,
    main,
    mcnemar_exact,
    wilson_interval,
)


@pytest.mark.parametrize("resample", ["images", "classes"])
def test_identical_predictions_give_zero_difference_and_p_one(resample):
    rng = np.random.default_rng(1)
    correct = rng.random(500) < 0.8
    labels = rng.integers(0, 50, 500)
    delta = bootstrap_for(labels, resample).paired(correct, correct)
    assert (delta.estimate, delta.low, delta.high) == (0.0, 0.0, 0.0)
    table = discordance(correct, correct)
    assert table.only_a == table.only_b == 0 and table.p_value == 1.0


def test_mcnemar_matches_the_binomial_by_hand():
    # 8 images only A gets right, 2 only B: P(X <= 2 | n=10, 1/2) = (1 + 10 + 45) / 1024, doubled
    assert mcnemar_exact(8, 2) == 112 / 1024
    assert mcnemar_exact(2, 8) == 112 / 1024
    assert mcnemar_exact(6, 0) == 2 / 64
    assert mcnemar_exact(1, 0) == 1.0  # 2 x 1/2
    assert mcnemar_exact(5, 5) == 1.0
    a = np.array([1] * 30 + [1] * 8 + [0] * 2 + [0] * 10, bool)
    b = np.array([1] * 30 + [0] * 8 + [1] * 2 + [0] * 10, bool)
    t = discordance(a, b)
    assert (t.both, t.only_a, t.only_b, t.neither) == (30, 8, 2, 10)
    assert t.p_value == 112 / 1024 and t.rate == 10 / 50


def test_mcnemar_for_many_discordant_images_agrees_with_exact_integers():
    n10, n01 = 1080, 960  # n = 2040: the log-space branch
    exact = 2 * sum(math.comb(2040, i) for i in range(961)) / 2**2040
    assert mcnemar_exact(n10, n01) == pytest.approx(exact, rel=1e-9)


def test_wilson_interval_by_hand():
    z2 = 1.959963984540054**2
    none_right = wilson_interval(0, 10)
    assert none_right.low == pytest.approx(0.0, abs=1e-12) and none_right.high == pytest.approx(z2 / (10 + z2))
    half = wilson_interval(50, 100)
    assert half.estimate == 0.5 and half.low == pytest.approx(1 - half.high)


def _simulate(rng, n_images, probs):
    """Per-image paired outcomes drawn from a 2x2 table (both, only_a, only_b, neither)."""
    cat = rng.choice(4, size=n_images, p=probs)
    return (cat == 0) | (cat == 1), (cat == 0) | (cat == 2)


def test_paired_bootstrap_covers_the_true_difference():
    probs = [0.72, 0.08, 0.04, 0.16]  # true Δ = 0.08 - 0.04
    rng = np.random.default_rng(2024)
    hits = 0
    sims = 300
    for s in range(sims):
        a, b = _simulate(rng, 300, probs)
        hits += Bootstrap(n_boot=1000, seed=s).paired(a, b).contains(0.04)
    assert hits / sims >= 0.90, hits / sims


def test_class_bootstrap_covers_when_classes_differ_and_the_image_bootstrap_does_not():
    """Methods whose difference lives in a few classes: the class bootstrap keeps its coverage."""
    rng = np.random.default_rng(7)
    n_classes, per_class, sims = 40, 8, 200
    labels = np.repeat(np.arange(n_classes), per_class)
    cover = {"images": 0, "classes": 0}
    for s in range(sims):
        # each class has its own gap between the two methods; the population's mean gap is 0.03
        gap = rng.uniform(0.03 - 0.4, 0.03 + 0.4, n_classes)
        base = rng.random(len(labels))
        a = base < (0.5 + gap[labels])
        b = base < 0.5
        for unit in cover:
            cover[unit] += bootstrap_for(labels, unit, n_boot=500, seed=s).paired(a, b).contains(0.03)
    assert cover["classes"] / sims >= 0.90, cover
    assert cover["images"] < cover["classes"], cover


def test_bootstrap_is_a_pure_function_of_its_data():
    rng = np.random.default_rng(3)
    a, b = rng.random(400) < 0.7, rng.random(400) < 0.6
    labels = rng.integers(0, 20, 400)
    for unit in ("images", "classes"):
        boot = bootstrap_for(labels, unit, seed=5)
        first = boot.paired(a, b)
        boot.paired(b, a)
        assert boot.paired(a, b) == first == bootstrap_for(labels, unit, seed=5).paired(a, b)


def test_detectable_delta():
    # at 50% power the detectable difference is the one whose interval just excludes 0
    assert detectable_delta(1300, 0.1, power=0.5) == pytest.approx(1.959964 * math.sqrt(0.1 / 1300), rel=1e-5)
    ds = [detectable_delta(n, 0.1) for n in (500, 1300, 5000)]
    assert ds[0] > ds[1] > ds[2]
    # and at 80% power a McNemar test on simulated runs with that difference finds it ~80% of the time
    q, n = 0.1, 1300
    d = detectable_delta(n, q)
    rng = np.random.default_rng(0)
    counts = rng.multinomial(n, [(q + d) / 2, (q - d) / 2, 1 - q], size=4000)
    z = (counts[:, 0] - counts[:, 1]) / np.sqrt(counts[:, 0] + counts[:, 1])
    assert 0.76 < np.mean(np.abs(z) > 1.959964) < 0.84


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="resample must be one of images, classes"):
        bootstrap_for(np.zeros(3), "pixels")
    with pytest.raises(ValueError, match="one value per image each"):
        Bootstrap().paired(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="n > 0"):
        wilson_interval(0, 0)


def test_docs_table_is_the_functions_output():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "docs" / "measurements.md").read_text().splitlines()
    start = readme.index("<!-- detectable-table: python -m bench.report.stats -->") + 1
    table = detectable_table([0.05, 0.10, 0.20], [500, 1300, 5000, 10000, 50000])
    assert readme[start : start + len(table)] == table


def test_the_command_prints_the_docs_table(capsys):
    assert main([]) == 0
    assert capsys.readouterr().out.splitlines() == detectable_table([0.05, 0.10, 0.20], [500, 1300, 5000, 10000, 50000])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--power", "1.5"], "--power must be strictly between 0 and 1, got 1.5"),
        (["--power", "0"], "--power must be strictly between 0 and 1, got 0.0"),
        (["--images", "500", "0"], "--images takes positive image counts, got 500 0"),
        (["--images", "-5"], "--images takes positive image counts, got -5"),
        (["--discordance", "0"], r"--discordance takes shares in \(0, 1\], got 0.0"),
        (["--discordance", "0.1", "1.5"], r"--discordance takes shares in \(0, 1\], got 0.1 1.5"),
    ],
)
def test_the_commands_bad_options_are_one_line(capsys, args, message):
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and re.fullmatch(f"error: {message}\n", captured.err)
