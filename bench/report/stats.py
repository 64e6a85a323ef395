"""Paired statistics for two models evaluated on the same images.

On about a thousand images one model's top-1 has a standard error of more than a point, while
token reducers differ by tenths of a point. Two models scored on the same images are strongly
correlated, so the honest comparison is paired: resample the images (or whole classes, since
one class can move a ranking) and recompute both accuracies on every resample, or count the
images on which exactly one of the two is right (McNemar). Pure numpy and the standard
library, so that every number can be checked by hand in the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

RESAMPLE_UNITS = ("images", "classes")


@dataclass(frozen=True)
class Interval:
    """A point estimate and a two-sided interval around it (same units as the data)."""

    estimate: float
    low: float
    high: float

    def contains(self, value: float = 0.0) -> bool:
        return self.low <= value <= self.high

    def scaled(self, factor: float) -> Interval:
        return Interval(self.estimate * factor, self.low * factor, self.high * factor)

    def negated(self) -> Interval:
        return Interval(-self.estimate, -self.high, -self.low)


class Bootstrap:
    """Seeded percentile bootstrap of a mean (or of a paired difference of means).

    Every call starts from the same seed, so an interval is a pure function of its data: the
    leaderboard is byte-identical whatever order the comparisons are made in.

    Args:
        clusters: the class of each image, to resample whole classes (a cluster bootstrap);
            None resamples single images.
        n_boot: number of resamples.
        seed: seed of every call's random generator.
        level: coverage of the two-sided interval.
    """

    def __init__(self, clusters: np.ndarray | None = None, n_boot: int = 2000, seed: int = 0, level: float = 0.95):
        if n_boot < 1:
            raise ValueError(f"n_boot must be at least 1, got {n_boot}")
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be in (0, 1), got {level}")
        self.n_boot, self.seed, self.level = int(n_boot), int(seed), float(level)
        self.clusters = None if clusters is None else np.asarray(clusters)
        self._weights: np.ndarray | None = None
        self._cluster_index: np.ndarray | None = None

    @property
    def unit(self) -> str:
        return "images" if self.clusters is None else "classes"

    def mean(self, x: np.ndarray) -> Interval:
        """Interval for the mean of ``x`` (one value per image)."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 1 or len(x) == 0:
            raise ValueError("the bootstrap needs a non-empty 1-D array of per-image values")
        means = self._image_means(x) if self.clusters is None else self._cluster_means(x)
        tail = (1.0 - self.level) / 2
        low, high = np.quantile(means, [tail, 1.0 - tail])
        return Interval(float(x.mean()), float(low), float(high))

    def paired(self, a: np.ndarray, b: np.ndarray) -> Interval:
        """Interval for ``mean(a) - mean(b)`` where ``a[i]`` and ``b[i]`` belong to image ``i``."""
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            raise ValueError(f"paired samples must have one value per image each, got {a.shape} and {b.shape}")
        return self.mean(a - b)

    def _image_means(self, x: np.ndarray) -> np.ndarray:
        # Resampling n images with replacement only matters through how many copies of each
        # distinct value are drawn: one multinomial draw over the distinct values is the same
        # bootstrap, and for 0/1 outcomes (2-3 values) it costs nothing.
        values, counts = np.unique(x, return_counts=True)
        if len(values) == 1:
            return np.full(1, values[0])
        rng = np.random.default_rng(self.seed)
        draws = rng.multinomial(len(x), counts / len(x), size=self.n_boot)
        return draws @ values / len(x)

    def _cluster_means(self, x: np.ndarray) -> np.ndarray:
        assert self.clusters is not None
        if len(self.clusters) != len(x):
            raise ValueError(f"{len(self.clusters)} cluster labels for {len(x)} values")
        if self._weights is None:
            _, self._cluster_index = np.unique(self.clusters, return_inverse=True)
            k = int(self._cluster_index.max()) + 1
            rng = np.random.default_rng(self.seed)
            # how often each class is drawn in each resample of k classes
            self._weights = rng.multinomial(k, np.full(k, 1.0 / k), size=self.n_boot).astype(np.float64)
        sums = np.bincount(self._cluster_index, weights=x)
        sizes = np.bincount(self._cluster_index).astype(np.float64)
        return (self._weights @ sums) / (self._weights @ sizes)


def bootstrap_for(labels: np.ndarray, resample: str, n_boot: int = 2000, seed: int = 0) -> Bootstrap:
    """A bootstrap over ``images`` or over ``classes`` (given each image's label)."""
    if resample not in RESAMPLE_UNITS:
        raise ValueError(f"resample must be one of {', '.join(RESAMPLE_UNITS)}, got {resample!r}")
    return Bootstrap(labels if resample == "classes" else None, n_boot=n_boot, seed=seed)


@dataclass(frozen=True)
class Discordance:
    """The 2x2 table of two models' per-image outcomes (e.g. correct / wrong)."""

    both: int
    only_a: int
    only_b: int
    neither: int

    @property
    def n(self) -> int:
        return self.both + self.only_a + self.only_b + self.neither

    @property
    def rate(self) -> float:
        """Fraction of images on which exactly one of the two is right."""
        return (self.only_a + self.only_b) / self.n if self.n else 0.0

    @property
    def p_value(self) -> float:
        return mcnemar_exact(self.only_a, self.only_b)


def discordance(a: np.ndarray, b: np.ndarray) -> Discordance:
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes must have one value per image each, got {a.shape} and {b.shape}")
    return Discordance(
        both=int((a & b).sum()), only_a=int((a & ~b).sum()), only_b=int((~a & b).sum()), neither=int((~a & ~b).sum())
    )


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p: under "no difference" each discordant image is a fair coin,
    so ``min(only_a, only_b)`` is Binomial(only_a + only_b, 1/2); p = 2 × its lower tail, at most 1."""
    if only_a < 0 or only_b < 0:
        raise ValueError("discordant counts must be non-negative")
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    if n <= 2000:  # exact integer arithmetic
        tail = sum(math.comb(n, i) for i in range(k + 1))
        return min(1.0, 2 * tail / 2**n)
    log_pmf = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(log_pmf)
    return min(1.0, 2 * math.exp(top) * sum(math.exp(v - top) for v in log_pmf))


def wilson_interval(successes: int, n: int, level: float = 0.95) -> Interval:
    """Wilson score interval for a proportion (stays inside [0, 1], good at small n)."""
    if n <= 0:
        raise ValueError("a proportion needs n > 0")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in 0..{n}, got {successes}")
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def detectable_delta(n_images: int, discordance_rate: float, level: float = 0.95, power: float = 0.8) -> float:
    """Smallest true difference in accuracy (a fraction) that a paired test at ``level`` finds
    with probability ``power``, when the two models disagree on ``discordance_rate`` of the
    images (Connor's sample size for McNemar's test, solved for the difference).

    With ``power=0.5`` it is the difference whose 95% interval just excludes 0 when observed.
    """
    if n_images <= 0 or not 0.0 < discordance_rate <= 1.0:
        raise ValueError("need n_images > 0 and a discordance rate in (0, 1]")
    za = NormalDist().inv_cdf(1 - (1 - level) / 2)
    zb = NormalDist().inv_cdf(power)
    q = discordance_rate

    def needed(delta: float) -> float:  # images needed to detect delta
        return (za * math.sqrt(q) + zb * math.sqrt(max(q - delta * delta, 0.0))) ** 2 / (delta * delta)

    lo, hi = 1e-9, q
    if needed(hi) > n_images:
        return float("nan")  # not detectable at any difference this discordance allows
    for _ in range(100):  # needed() falls as delta grows
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if needed(mid) > n_images else (lo, mid)
    return hi


def detectable_table(
    discordance_rates: list[float], image_counts: list[int], level: float = 0.95, power: float = 0.8
) -> list[str]:
    """Markdown rows: images vs the smallest detectable Δ top-1 (points) at each discordance."""
    head = "| images | " + " | ".join(f"{100 * q:.0f}% discordant" for q in discordance_rates) + " |"
    lines = [head, "|---" * (len(discordance_rates) + 1) + "|"]
    for n in image_counts:
        cells = [f"{100 * detectable_delta(n, q, level, power):.2f}" for q in discordance_rates]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.report.stats``: the table of :func:`detectable_table`; bad options are
    one ``error:`` line and exit status 2."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m bench.report.stats", description="Images vs the smallest detectable Δ top-1 (points)."
    )
    parser.add_argument(
        "--discordance",
        type=float,
        nargs="+",
        default=[0.05, 0.10, 0.20],
        help="shares of images the two methods disagree on, one column each (default: %(default)s)",
    )
    parser.add_argument(
        "--images",
        type=int,
        nargs="+",
        default=[500, 1300, 5000, 10000, 50000],
        help="evaluation set sizes, one row each (default: %(default)s)",
    )
    parser.add_argument("--power", type=float, default=0.8, help="chance of detecting the difference (default 0.8)")
    args = parser.parse_args(argv)
    problem = None
    if not all(0.0 < q <= 1.0 for q in args.discordance):
        problem = f"--discordance takes shares in (0, 1], got {' '.join(map(str, args.discordance))}"
    elif not all(n > 0 for n in args.images):
        problem = f"--images takes positive image counts, got {' '.join(map(str, args.images))}"
    elif not 0.0 < args.power < 1.0:
        problem = f"--power must be strictly between 0 and 1, got {args.power}"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    print("\n".join(detectable_table(args.discordance, args.images, power=args.power)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
