"""Paired confidence intervals: how far each method is from a reference method, over seeds.

Runs of two methods with the same seed share the data order, initialisation and benchmark
draw, so the difference per seed d_s = x_s - r_s removes the seed's own effect; the interval
is for the mean of d over the seeds both methods ran (unpaired seeds are left out):

- ``t``: mean(d) ± t_{(1+c)/2, n-1} · sd(d) / sqrt(n) (Student's paired t; exact under normal d).
- ``bootstrap``: percentile interval of mean(d) over resamples of the seeds with replacement
  (fixed generator seed, so a table renders the same every time).

With fewer than 2 pairs there is no interval (NaN bounds): one seed says nothing about noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

KINDS = ("t", "bootstrap")


@dataclass(frozen=True)
class PairedInterval:
    mean: float  # mean over paired seeds of (method - reference)
    low: float
    high: float
    n: int  # paired seeds
    kind: str  # "t" or "bootstrap"
    confidence: float

    @property
    def excludes_zero(self) -> bool:
        """The interval lies on one side of 0 (NaN bounds never do)."""
        return self.low > 0 or self.high < 0


def paired_differences(values: Mapping[int, float], reference: Mapping[int, float]) -> np.ndarray:
    """d_s = values[s] - reference[s] over the seeds both have, NaN values left out, by seed."""
    seeds = sorted(s for s in values.keys() & reference.keys())
    d = np.array([values[s] - reference[s] for s in seeds], dtype=float)
    return d[~np.isnan(d)]


def paired_interval(
    values: Mapping[int, float],
    reference: Mapping[int, float],
    confidence: float = 0.95,
    kind: str = "t",
    resamples: int = 10_000,
    seed: int = 0,
) -> PairedInterval:
    """Confidence interval of the mean paired difference ``values - reference`` (by seed)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: expected a value in (0, 1)")
    d = paired_differences(values, reference)
    n = int(d.size)
    if n == 0:
        return PairedInterval(math.nan, math.nan, math.nan, 0, kind, confidence)
    mean = float(d.mean())
    if n < 2:
        return PairedInterval(mean, math.nan, math.nan, n, kind, confidence)
    if kind == "t":
        half = scipy_stats.t.ppf((1 + confidence) / 2, n - 1) * d.std(ddof=1) / math.sqrt(n)
        return PairedInterval(mean, mean - half, mean + half, n, kind, confidence)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return PairedInterval(mean, float(low), float(high), n, kind, confidence)
