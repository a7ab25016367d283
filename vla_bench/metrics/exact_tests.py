"""The exact tests of the regression gate: one-sided p-values of a drop beyond a margin, per task and per suite.

What the hypotheses and verdicts are: vla_bench/metrics/verdicts.py.

Tests, per task:
- paired, m = 0: exact McNemar: conditional on the discordant pairs, the number of "baseline succeeded, candidate
  failed" pairs is Binomial(discordant, 1/2) under H0 (exact; scipy.stats.binom).
- paired, m > 0: exact unconditional test ordered by Tango's (1998) score statistic; the nuisance (the discordance
  rate) is maximized over a fine grid on the null boundary. McNemar's conditioning trick does not apply with a
  margin, and scipy has no paired non-inferiority test.
- unpaired (init indices that do not pair up), m = 0: Boschloo's exact test (scipy.stats.boschloo_exact).
- unpaired, m > 0: exact unconditional test ordered by the Farrington-Manning score statistic (scipy has none).
Suite level (a stratified test across tasks, weighting tasks by their episodes like LIBERO's suite success rate):
- paired, m = 0: exact McNemar on all discordant pairs of the suite. This *is* the Cochran-Mantel-Haenszel test with
  one stratum per (task, init state) pair (tests check the identity), and it is exact, so it needs no large-sample
  argument; its null is "no task has a drop".
- paired, m > 0: stratified Tango score statistic (sum over tasks), normal approximation (hundreds of pairs).
- unpaired: one-sided Cochran-Mantel-Haenszel (m = 0) or stratified Farrington-Manning (m > 0), normal approximation.
Per-task verdicts in a suite use Holm-adjusted p-values (family = the suite's tasks).
"""
from __future__ import annotations

import functools
import math
from typing import Iterable, Sequence

import numpy as np
from scipy import special, stats


#: nuisance-parameter grid points for the exact unconditional tests; scipy's boschloo_exact uses 32 Sobol points
#: plus a local optimizer, a dense grid is as accurate here and vectorizes over every table at once.
_NUISANCE_GRID = 1001

# ----------------------------------------------------------------------------------------------- single statistics


def mcnemar_exact_pvalue(only_baseline, only_candidate):
    """One-sided exact McNemar p-value for "the candidate is worse": P(X >= only_baseline), X ~ Bin(discordant, 1/2).

    Vectorized; equals scipy.stats.binomtest(b, b + c, 0.5, alternative='greater').pvalue (the tests check).
    No discordant pairs -> 1.
    """
    b = np.asarray(only_baseline)
    c = np.asarray(only_candidate)
    p = stats.binom.sf(b - 1, b + c, 0.5)
    return _scalar_or_array(np.where(b + c > 0, np.minimum(p, 1.0), 1.0))


def tango_constrained_rate(only_baseline, only_candidate, pairs, margin):
    """Tango's (1998) closed-form restricted MLE of P(only candidate succeeded) under P(only baseline) - P(only
    candidate) = margin (Statistics in Medicine 17:891, eq. 3)."""
    b, c, n = (np.asarray(x, dtype=float) for x in (only_baseline, only_candidate, pairs))
    a_coef = 2.0 * n
    b_coef = -b - c + (2.0 * n - b + c) * margin
    c_coef = -c * margin * (1.0 - margin)
    discriminant = np.maximum(b_coef * b_coef - 4.0 * a_coef * c_coef, 0.0)
    return np.where(n > 0, (-b_coef + np.sqrt(discriminant)) / (2.0 * np.where(n > 0, a_coef, 1.0)), 0.0)


def tango_statistic(only_baseline, only_candidate, pairs, margin):
    """Tango's score statistic for H0: baseline rate - candidate rate = margin (paired); large = candidate worse.
    With margin 0 it is McNemar's (b - c) / sqrt(b + c)."""
    b, c, n = (np.asarray(x, dtype=float) for x in (only_baseline, only_candidate, pairs))
    q = tango_constrained_rate(b, c, n, margin)
    variance = n * (2.0 * q + margin * (1.0 - margin))
    numerator = b - c - n * margin
    return _safe_ratio(numerator, np.sqrt(variance))


def farrington_manning_statistic(baseline_successes, baseline_n, candidate_successes, candidate_n, margin):
    """Farrington-Manning score statistic for H0: baseline rate - candidate rate = margin (unpaired); large =
    candidate worse. The restricted MLE is found by bisection (the log-likelihood is concave along the null line),
    vectorized over tables; with margin 0 it is the pooled two-proportion z statistic."""
    kb, nb, kc, nc = (np.asarray(x, dtype=float) for x in
                      (baseline_successes, baseline_n, candidate_successes, candidate_n))
    pc = _restricted_candidate_rate(kb, nb, kc, nc, margin)
    pb = pc + margin
    variance = pb * (1.0 - pb) / nb + pc * (1.0 - pc) / nc
    numerator = kb / nb - kc / nc - margin
    return _safe_ratio(numerator, np.sqrt(np.maximum(variance, 0.0)))


def _restricted_candidate_rate(kb, nb, kc, nc, margin, iterations: int = 64):
    low = np.zeros(np.broadcast(kb, nb, kc, nc).shape)
    high = np.full_like(low, 1.0 - margin)
    for _ in range(iterations):
        # kept strictly inside the interval: at its ends a rate of 0 or 1 makes the slope 0/0
        mid = np.clip((low + high) / 2.0, 1e-12, 1.0 - margin - 1e-12)
        slope = kb / (mid + margin) - (nb - kb) / (1.0 - mid - margin) + kc / mid - (nc - kc) / (1.0 - mid)
        low = np.where(slope > 0, mid, low)
        high = np.where(slope > 0, high, mid)
    return (low + high) / 2.0


def boschloo_pvalue(baseline_successes: int, baseline_n: int, candidate_successes: int, candidate_n: int) -> float:
    """One-sided Boschloo exact p-value for "the baseline's rate is higher" (scipy.stats.boschloo_exact)."""
    return _boschloo_cached(int(baseline_successes), int(baseline_n), int(candidate_successes), int(candidate_n))


@functools.lru_cache(maxsize=65536)
def _boschloo_cached(kb: int, nb: int, kc: int, nc: int) -> float:
    # scipy's table has one column per group: [[successes], [failures]]; "greater" is H1: p_column1 > p_column2.
    table = [[kb, kc], [nb - kb, nc - kc]]
    return float(min(1.0, stats.boschloo_exact(table, alternative="greater").pvalue))


def cochran_mantel_haenszel(tables: Iterable, continuity: bool = False) -> dict:
    """Cochran-Mantel-Haenszel test over 2x2 strata [[a, b], [c, d]] (rows: groups; columns: success, failure).

    Returns the signed z (positive: the first row does better), chi2 = z^2 (continuity-corrected if asked, as R's
    mantelhaen.test does by default), the two-sided p of chi2, the one-sided p for "first row better", and the
    Mantel-Haenszel common odds ratio. Strata with fewer than two observations carry no information and are skipped.
    Written here because scipy has no CMH test and statsmodels is not a dependency.
    """
    deviation = variance = or_numerator = or_denominator = 0.0
    for table in tables:
        (a, b), (c, d) = np.asarray(table, dtype=float)
        n = a + b + c + d
        if n < 2:
            continue
        deviation += a - (a + b) * (a + c) / n
        variance += (a + b) * (c + d) * (a + c) * (b + d) / (n * n * (n - 1.0))
        or_numerator += a * d / n
        or_denominator += b * c / n
    if variance <= 0:
        return {"z": 0.0, "chi2": 0.0, "pvalue": 1.0, "pvalue_greater": 1.0, "odds_ratio": float("nan")}
    z = deviation / math.sqrt(variance)
    corrected = max(abs(deviation) - (0.5 if continuity else 0.0), 0.0)
    chi2 = corrected * corrected / variance
    return {
        "z": z,
        "chi2": chi2,
        "pvalue": float(stats.chi2.sf(chi2, 1)),
        "pvalue_greater": float(stats.norm.sf(z)),
        "odds_ratio": or_numerator / or_denominator if or_denominator > 0 else float("inf"),
    }


def holm_adjust(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (reject i at level alpha iff adjusted_i < alpha). scipy only ships
    Benjamini-Hochberg (false_discovery_control), which controls a weaker error rate than a gate wants."""
    p = np.asarray(pvalues, dtype=float)
    m = p.size
    if m == 0:
        return []
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted_sorted = np.maximum.accumulate(scaled)
    adjusted = np.empty(m)
    adjusted[order] = adjusted_sorted
    return adjusted.tolist()


# ------------------------------------------------------------------------------ exact unconditional p-value tables


def _exact_unconditional_pvalues(statistic: np.ndarray, null_probabilities: np.ndarray) -> np.ndarray:
    """p(t) = max over nuisance values of P(T >= T(t)), for every table t of a finite sample space at once.

    statistic: (S,) larger = more evidence against H0. null_probabilities: (G, S), the pmf of every table under
    each of G nuisance values on the null boundary. Ties in T count as "at least as extreme".
    """
    order = np.argsort(-statistic, kind="stable")
    sorted_statistic = statistic[order]
    cumulative = np.cumsum(null_probabilities[:, order], axis=1)
    scale = np.maximum(1.0, np.abs(sorted_statistic))
    same_as_next = np.r_[np.abs(np.diff(sorted_statistic)) <= 1e-9 * scale[:-1], False]
    group_ends = np.flatnonzero(~same_as_next)
    group_of_position = np.searchsorted(group_ends, np.arange(statistic.size))
    pvalues_sorted = cumulative[:, group_ends].max(axis=0)[group_of_position]
    pvalues = np.empty_like(pvalues_sorted)
    pvalues[order] = pvalues_sorted
    return np.minimum(pvalues, 1.0)


@functools.lru_cache(maxsize=64)
def paired_margin_pvalue_table(pairs: int, margin: float) -> np.ndarray:
    """Exact unconditional p-values of the paired margin test for every (only_baseline, only_candidate) with
    b + c <= pairs; entry [b, c] (NaN where b + c > pairs). Ordered by Tango's statistic; the nuisance P(only
    candidate) runs over [0, (1 - margin) / 2] on the boundary P(only baseline) = P(only candidate) + margin."""
    b, c = _paired_sample_space(pairs)
    statistic = tango_statistic(b, c, pairs, margin)
    nuisance = np.linspace(0.0, (1.0 - margin) / 2.0, _NUISANCE_GRID)[:, None]
    probabilities = _trinomial_pmf(b, c, pairs, nuisance + margin, nuisance)
    table = np.full((pairs + 1, pairs + 1), np.nan)
    table[b, c] = _exact_unconditional_pvalues(statistic, probabilities)
    return table


@functools.lru_cache(maxsize=64)
def unpaired_pvalue_table(baseline_n: int, candidate_n: int, margin: float) -> np.ndarray:
    """Exact unconditional p-values for every (baseline successes, candidate successes); entry [kb, kc].

    margin 0: Boschloo's test (ordered by Fisher's one-sided p), the same test as scipy.stats.boschloo_exact, here
    for every table at once (power and simulations need all of them; the tests check agreement with scipy).
    margin > 0: ordered by the Farrington-Manning statistic. Nuisance: the candidate rate on the null boundary.
    """
    kb, kc = (x.ravel() for x in np.meshgrid(np.arange(baseline_n + 1), np.arange(candidate_n + 1), indexing="ij"))
    if margin == 0.0:
        fisher = stats.hypergeom.sf(kb - 1, baseline_n + candidate_n, kb + kc, baseline_n)
        statistic = -np.log(np.maximum(fisher, 1e-300))
    else:
        statistic = farrington_manning_statistic(kb, baseline_n, kc, candidate_n, margin)
    candidate_rate = np.linspace(0.0, 1.0 - margin, _NUISANCE_GRID)[:, None]
    probabilities = (stats.binom.pmf(kb, baseline_n, candidate_rate + margin)
                     * stats.binom.pmf(kc, candidate_n, candidate_rate))
    return _exact_unconditional_pvalues(statistic, probabilities).reshape(baseline_n + 1, candidate_n + 1)


def _paired_sample_space(pairs: int):
    b, c = np.meshgrid(np.arange(pairs + 1), np.arange(pairs + 1), indexing="ij")
    valid = b + c <= pairs
    return b[valid], c[valid]


def _trinomial_pmf(b, c, pairs, p_only_baseline, p_only_candidate):
    """pmf of (only_baseline, only_candidate, concordant) ~ Multinomial(pairs; p_b, p_c, 1 - p_b - p_c)."""
    concordant = pairs - b - c
    p_concordant = np.clip(1.0 - p_only_baseline - p_only_candidate, 0.0, 1.0)
    log_pmf = (special.gammaln(pairs + 1) - special.gammaln(b + 1) - special.gammaln(c + 1)
               - special.gammaln(concordant + 1) + special.xlogy(b, p_only_baseline)
               + special.xlogy(c, p_only_candidate) + special.xlogy(concordant, p_concordant))
    return np.exp(log_pmf)


# ---------------------------------------------------------------------------------------- vectorized task figures


def paired_pvalues(only_baseline, only_candidate, pairs: int, margin: float):
    """The per-task paired test's one-sided p-values, vectorized over tables of `pairs` pairs."""
    if margin == 0.0:
        return mcnemar_exact_pvalue(only_baseline, only_candidate)
    table = paired_margin_pvalue_table(int(pairs), float(margin))
    return _scalar_or_array(table[np.asarray(only_baseline), np.asarray(only_candidate)])


def unpaired_pvalues(baseline_successes, baseline_n: int, candidate_successes, candidate_n: int, margin: float):
    """The per-task unpaired test's one-sided p-values; margin 0 calls scipy's boschloo_exact per distinct table."""
    if margin == 0.0:
        kb, kc = np.broadcast_arrays(np.asarray(baseline_successes), np.asarray(candidate_successes))
        flat = [boschloo_pvalue(x, baseline_n, y, candidate_n) for x, y in zip(kb.ravel(), kc.ravel())]
        return _scalar_or_array(np.asarray(flat).reshape(kc.shape))
    table = unpaired_pvalue_table(int(baseline_n), int(candidate_n), float(margin))
    return _scalar_or_array(table[np.asarray(baseline_successes), np.asarray(candidate_successes)])



# --------------------------------------------------------------------------------------------------- helpers


def _safe_ratio(numerator, denominator):
    """numerator / denominator, with 0/0 = 0 and x/0 = +-inf: a table with no variance under H0 is either no
    evidence at all or complete evidence."""
    numerator = np.asarray(numerator, dtype=float)
    denominator = np.asarray(denominator, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0),
                         np.where(numerator == 0, 0.0, np.sign(numerator) * np.inf))
    return _scalar_or_array(ratio)


def _scalar_or_array(x):
    x = np.asarray(x, dtype=float)
    return float(x) if x.ndim == 0 else x
