"""Confidence intervals on success rates and on differences of success rates.

Every function takes counts (successes k out of n episodes) and a two-sided `confidence`, and returns (low, high)
as fractions in [0, 1] (or [-1, 1] for differences). The closed-form ones accept numpy arrays as well as ints, so the
gate can evaluate them over every reachable outcome table at once (curtailment, power); the tests check them against
scipy where scipy has them.

Conventions:
- No episodes (n = 0) says nothing about the rate: the interval is the whole range, (0, 1).
- Differences are "first minus second"; the gate passes the candidate first, so a negative difference is a drop.
"""
from __future__ import annotations

import numpy as np
from scipy import stats

from ..errors import VlaBenchError


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(stats.norm.ppf(0.5 + confidence / 2.0))


def _check_counts(k, n) -> None:
    k, n = np.asarray(k), np.asarray(n)
    if np.any(n < 0) or np.any(k < 0) or np.any(k > n):
        raise ValueError(f"need 0 <= successes <= episodes, got successes={k}, episodes={n}")


def wilson_interval(k, n, confidence: float = 0.95):
    """Wilson score interval for a binomial rate k/n; (0, 1) when n = 0.

    Wilson rather than the Wald interval because at 50 episodes rates near 0 or 1 are common, where Wald collapses
    to a zero-width interval. Written in closed form (not scipy's binomtest(...).proportion_ci('wilson'), which the
    tests compare against) so that it vectorizes and accepts n = 0.
    """
    _check_counts(k, n)
    z = _z(confidence)
    k = np.asarray(k, dtype=float)
    n = np.asarray(n, dtype=float)
    safe_n = np.where(n > 0, n, 1.0)
    p = k / safe_n
    denominator = 1.0 + z * z / safe_n
    centre = (p + z * z / (2.0 * safe_n)) / denominator
    half_width = z * np.sqrt(p * (1.0 - p) / safe_n + z * z / (4.0 * safe_n * safe_n)) / denominator
    low = np.where(n > 0, np.clip(centre - half_width, 0.0, 1.0), 0.0)
    high = np.where(n > 0, np.clip(centre + half_width, 0.0, 1.0), 1.0)
    # The closed form can miss the exact ends by rounding; the interval must contain 0 when k = 0 and 1 when k = n.
    low = np.where(k == 0, 0.0, low)
    high = np.where((k == n) & (n > 0), 1.0, high)
    return _scalar_or_array(low), _scalar_or_array(high)


def clopper_pearson_interval(k, n, confidence: float = 0.95):
    """Clopper-Pearson ("exact") interval for k/n from beta quantiles; (0, 1) when n = 0.

    Guaranteed coverage at least `confidence` for every true rate, at the price of being wider than Wilson.
    """
    _check_counts(k, n)
    tail = (1.0 - confidence) / 2.0
    _z(confidence)  # validates confidence
    k = np.asarray(k, dtype=float)
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        low = np.where(k > 0, stats.beta.ppf(tail, k, n - k + 1), 0.0)
        high = np.where(k < n, stats.beta.ppf(1.0 - tail, k + 1, n - k), 1.0)
    low = np.where(n > 0, low, 0.0)
    high = np.where(n > 0, high, 1.0)
    return _scalar_or_array(low), _scalar_or_array(high)


def newcombe_difference_interval(k1, n1, k2, n2, confidence: float = 0.95):
    """Interval on p1 - p2 for two independent rates: Newcombe's hybrid score interval (method 10 of Newcombe 1998,
    Statistics in Medicine 17:873), built from the two Wilson intervals.

    Chosen over Wald because it stays inside [-1, 1] and keeps close to nominal coverage at small n and extreme
    rates; scipy has no interval on a difference of proportions.
    """
    p1, p2 = _rate(k1, n1), _rate(k2, n2)
    l1, u1 = wilson_interval(k1, n1, confidence)
    l2, u2 = wilson_interval(k2, n2, confidence)
    difference = p1 - p2
    low = difference - np.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = difference + np.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return _scalar_or_array(np.clip(low, -1.0, 1.0)), _scalar_or_array(np.clip(high, -1.0, 1.0))


def paired_difference_interval(both, only_first, only_second, neither, confidence: float = 0.95):
    """Interval on p1 - p2 for paired binary outcomes (the same init states run by two checkpoints): Newcombe's
    method 10 for paired data (Newcombe 1998, Statistics in Medicine 17:2635).

    The four counts are the paired 2x2 table: both succeeded, only the first, only the second, neither. The interval
    combines the Wilson intervals of the two marginal rates with the (continuity-adjusted) phi correlation of the
    pairs, so positively correlated checkpoints (the usual case: hard init states are hard for both) get a narrower
    interval than `newcombe_difference_interval` would give the same rates. With phi = 0 (in particular whenever
    0 <= ad - bc <= n/2) it reduces exactly to that interval.
    """
    a, b, c, d = (np.asarray(x, dtype=float) for x in (both, only_first, only_second, neither))
    n = a + b + c + d
    l1, u1 = wilson_interval(a + b, n, confidence)
    l2, u2 = wilson_interval(a + c, n, confidence)
    p1, p2 = _rate(a + b, n), _rate(a + c, n)
    phi = _newcombe_phi(a, b, c, d)
    difference = p1 - p2
    below = (p1 - l1) ** 2 - 2.0 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    above = (u1 - p1) ** 2 - 2.0 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    low = difference - np.sqrt(np.maximum(below, 0.0))
    high = difference + np.sqrt(np.maximum(above, 0.0))
    low = np.where(n > 0, np.clip(low, -1.0, 1.0), -1.0)
    high = np.where(n > 0, np.clip(high, -1.0, 1.0), 1.0)
    return _scalar_or_array(low), _scalar_or_array(high)


def _newcombe_phi(a, b, c, d):
    """The correlation of the two marginal rates as Newcombe's method 10 uses it: the phi coefficient with its
    numerator ad - bc shrunk by n/2 towards 0 when positive (a continuity adjustment; 0 when ad - bc <= n/2), and
    0 when a margin is empty. Matches the published method (and the R packages biostatUZH and contingencytables)."""
    n = a + b + c + d
    cross = a * d - b * c
    adjusted = np.where(cross > n / 2.0, cross - n / 2.0, np.where(cross < 0, cross, 0.0))
    denominator = (a + b) * (c + d) * (a + c) * (b + d)
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, adjusted / np.sqrt(safe), 0.0)


def _rate(k, n):
    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    return np.where(n > 0, k / np.where(n > 0, n, 1.0), 0.0)


def _scalar_or_array(x):
    """Plain floats for scalar input (what tables and JSON want), arrays for array input."""
    x = np.asarray(x, dtype=float)
    return float(x) if x.ndim == 0 else x


def paired_bootstrap_interval(baseline_values, candidate_values, *, confidence: float = 0.95,
                              resamples: int = 9999, seed: int = 0) -> tuple[float, float, float]:
    """(mean difference candidate - baseline, low, high): a BCa bootstrap interval that resamples episodes, keeping
    each episode's two values together (scipy.stats.bootstrap, paired=True). For open-loop proxy metrics (e.g.
    per-episode action error) measured on the same episodes by both checkpoints. Fixed seed: the same arrays
    always give the same interval."""
    base = np.asarray(baseline_values, dtype=float)
    cand = np.asarray(candidate_values, dtype=float)
    if base.shape != cand.shape or base.ndim != 1:
        raise VlaBenchError(f"paired metrics need two 1-d arrays of equal length, got {base.shape} and {cand.shape}")
    if base.size < 2:
        raise VlaBenchError(f"a bootstrap interval needs at least 2 episodes, got {base.size}")
    differences = cand - base
    estimate = float(differences.mean())
    if np.ptp(differences) == 0:  # every episode moved by the same amount: nothing to resample
        return estimate, estimate, estimate
    result = stats.bootstrap((differences,), np.mean, confidence_level=confidence, n_resamples=resamples,
                             method="BCa", rng=np.random.default_rng(seed), vectorized=True)
    return estimate, float(result.confidence_interval.low), float(result.confidence_interval.high)
