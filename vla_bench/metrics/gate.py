"""Regression gates: is a candidate checkpoint worse than a stored baseline, beyond a margin, on LIBERO?

Assumptions (the conditions under which the stated error rates hold):

1. Episodes are independent given their init state, and episode i of every checkpoint starts from LIBERO's fixed
   init state i. So baseline and candidate outcomes pair up by (task, init index), and every test conditions on the
   init states that were run. Different tasks are independent strata.
2. The hypotheses are one-sided and about success rates. With d = candidate rate - baseline rate and margin m >= 0
   (`--vla-compare-fail=drop:5pp` gives m = 0.05):  H0: d >= -m (no drop beyond the margin)  vs  H1: d < -m.
   A gate *fails* when H0 is rejected at level alpha, i.e. the candidate is worse with p < alpha beyond the margin.
3. A gate that does not fail *passes* when the two-sided `confidence` interval of d lies above -m (a drop larger
   than the margin is ruled out), and is *inconclusive* when the interval still allows such a drop. `strict`
   (non-inferiority mode) turns inconclusive into fail; with the default 95% interval that is a one-sided
   non-inferiority test at 2.5%. With m = 0 almost every equal pair of checkpoints is inconclusive, because "no
   drop at all" can never be shown; strict mode is meant to be used with a margin.

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

Intervals: Wilson on each rate, Newcombe's paired (or unpaired) hybrid score interval on each difference; a paired
bootstrap interval for continuous proxy metrics.

The smallest detectable drop of a test is the smallest true drop (candidate rate = baseline rate - drop, baseline
rate = the observed one) that this test, at this alpha and this many episodes, rejects with probability >= `power`
(80% by default), computed exactly from the test's rejection region, assuming the two checkpoints' outcomes are
independent given the init state. Positively correlated checkpoints (the usual case) make paired tests more powerful,
so the figure is a conservative guide. None when even a drop to 0% would not reach that power.

Curtailment is deterministic and exact: a task's verdict is declared early only when every possible outcome of the
remaining episodes gives the same final verdict, so it never changes a verdict (the tests run both ways):
`gate_curtailment` for one task's compare_task verdict, `suite_gate_curtailment` for Holm-adjusted verdicts within a
suite, `threshold_curtailment` for the suite's threshold rule (`meets_threshold`). The sequential gate is a
different, optional test (group-sequential, O'Brien-Fleming-type alpha spending).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from scipy import special, stats

from ..thresholds import Threshold
from ..errors import VlaBenchError
from .intervals import newcombe_difference_interval, paired_difference_interval

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"
_CODES = {0: PASS, 1: INCONCLUSIVE, 2: FAIL}
DEFAULT_ALPHA = 0.05
DEFAULT_POWER = 0.8

#: nuisance-parameter grid points for the exact unconditional tests; scipy's boschloo_exact uses 32 Sobol points
#: plus a local optimizer, a dense grid is as accurate here and vectorizes over every table at once.
_NUISANCE_GRID = 1001


# ----------------------------------------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class TaskOutcomes:
    """One checkpoint's episodes of one task: init-state index -> success."""

    task: str
    outcomes: Mapping[int, bool]

    def __post_init__(self):
        clean = {int(i): bool(s) for i, s in sorted(self.outcomes.items())}
        if any(i < 0 for i in clean):
            raise VlaBenchError(f"task {self.task}: init-state indices must be >= 0, got {min(clean)}")
        object.__setattr__(self, "outcomes", clean)

    @property
    def episodes(self) -> int:
        return len(self.outcomes)

    @property
    def successes(self) -> int:
        return sum(self.outcomes.values())

    @property
    def rate(self) -> float:
        return self.successes / self.episodes if self.outcomes else float("nan")


@dataclasses.dataclass(frozen=True)
class PairedCounts:
    """The paired 2x2 table of one task: how the init states split by (baseline outcome, candidate outcome)."""

    both: int
    only_baseline: int  # baseline succeeded, candidate failed: the pairs that count against the candidate
    only_candidate: int
    neither: int

    @property
    def pairs(self) -> int:
        return self.both + self.only_baseline + self.only_candidate + self.neither

    def __add__(self, other: "PairedCounts") -> "PairedCounts":
        return PairedCounts(*(x + y for x, y in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


def paired_counts(baseline: TaskOutcomes, candidate: TaskOutcomes) -> PairedCounts:
    """Pair the candidate's episodes with the baseline's of the same init state (candidate indices must be a subset
    of the baseline's; see `can_pair`)."""
    missing = sorted(set(candidate.outcomes) - set(baseline.outcomes))
    if missing:
        raise VlaBenchError(f"task {candidate.task}: the baseline has no episodes for init states {missing[:10]}")
    pairs = [(baseline.outcomes[i], success) for i, success in candidate.outcomes.items()]
    return PairedCounts(
        both=sum(b and c for b, c in pairs),
        only_baseline=sum(b and not c for b, c in pairs),
        only_candidate=sum(c and not b for b, c in pairs),
        neither=sum(not b and not c for b, c in pairs),
    )


def can_pair(baseline: TaskOutcomes, candidate: TaskOutcomes) -> bool:
    """Pairing is possible when every candidate init state was also run by the baseline."""
    return bool(candidate.outcomes) and set(candidate.outcomes) <= set(baseline.outcomes)


# -------------------------------------------------------------------------------------------------------- margins

_DROP_SPEC = re.compile(r"^\s*drop\s*:\s*(\d+(?:\.\d+)?)\s*(pp|%)?\s*$", re.IGNORECASE)


def parse_fail_spec(spec: str | None) -> float:
    """`drop:5pp` (or `drop:5%`, `drop:0`) -> margin 0.05 as a fraction; None or '' -> 0.

    Percentage points are the unit because success rates are reported in percent; a bare number means points too,
    so `drop:0.05` is 0.05 points, not 5 -- say `drop:5pp`.
    """
    if spec is None or not spec.strip():
        return 0.0
    match = _DROP_SPEC.match(spec)
    if not match:
        raise VlaBenchError(f"invalid fail spec {spec!r}; expected drop:<points>pp, e.g. drop:5pp or drop:0")
    margin = float(match.group(1)) / 100.0
    if margin >= 1.0:
        raise VlaBenchError(f"invalid fail spec {spec!r}: a drop margin must be below 100pp")
    return margin


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


def verdict_codes(pvalue, ci_low, alpha: float, margin: float, strict: bool):
    """0 pass, 1 inconclusive, 2 fail (see the module docstring); vectorized so that curtailment evaluates exactly
    the rule that the full run applies."""
    pvalue, ci_low = np.asarray(pvalue), np.asarray(ci_low)
    failed = pvalue < alpha
    undecided = ~failed & (ci_low < -margin)
    return np.where(failed, 2, np.where(undecided, 2 if strict else 1, 0))


def _paired_task_figures(both, only_baseline, only_candidate, neither, *, margin, confidence):
    """(one-sided p, interval low end of candidate - baseline), vectorized over paired tables of equal size."""
    pairs = int(np.max(np.asarray(both) + only_baseline + only_candidate + neither))
    pvalue = paired_pvalues(only_baseline, only_candidate, pairs, margin)
    # the difference is candidate - baseline, so the candidate's marginal goes first
    ci_low, _ = paired_difference_interval(both, only_candidate, only_baseline, neither, confidence)
    return np.asarray(pvalue), np.asarray(ci_low)


def _unpaired_task_figures(baseline_successes, baseline_n, candidate_successes, candidate_n, *, margin, confidence):
    pvalue = unpaired_pvalues(baseline_successes, baseline_n, candidate_successes, candidate_n, margin)
    ci_low, _ = newcombe_difference_interval(candidate_successes, candidate_n, baseline_successes, baseline_n,
                                             confidence)
    return np.asarray(pvalue), np.asarray(ci_low)


# ----------------------------------------------------------------------------------------------- detectable drop


def smallest_detectable_drop(baseline_rate: float, episodes: int, *, alpha: float = DEFAULT_ALPHA,
                             margin: float = 0.0, power: float = DEFAULT_POWER, paired: bool = True,
                             candidate_episodes: int | None = None, suite_level: bool = False) -> float | None:
    """The smallest true drop this test detects with probability >= `power` (definition: module docstring).

    Exact: power = sum over every outcome table of its probability times [the test rejects]. Per task the rejection
    region is the real test's; at suite level (suite_level=True, `episodes` = all pairs) it is the pooled version
    of the suite test (exact McNemar, or the score statistic beyond the normal quantile), ignoring differences
    between tasks' rates. Resolution 0.001 (bisection; power grows with the drop).
    """
    if not 0.0 <= baseline_rate <= 1.0 or episodes < 1:
        return None
    candidate_episodes = episodes if candidate_episodes is None else candidate_episodes
    power_at = _power_function(episodes, candidate_episodes, baseline_rate, alpha, margin, paired, suite_level)
    low, high = margin, baseline_rate
    if high <= low or power_at(high) < power:
        return None
    while high - low > 0.0005:
        mid = (low + high) / 2.0
        if power_at(mid) >= power:
            high = mid
        else:
            low = mid
    return math.ceil(high * 1000.0 - 1e-9) / 1000.0


def _power_function(n, n_candidate, baseline_rate, alpha, margin, paired, suite_level) -> Callable[[float], float]:
    if paired:
        b, c = _paired_sample_space(n)
        if margin == 0.0:
            rejects = np.asarray(mcnemar_exact_pvalue(b, c)) < alpha
        elif suite_level:
            rejects = tango_statistic(b, c, n, margin) > stats.norm.isf(alpha)
        else:
            rejects = paired_margin_pvalue_table(n, margin)[b, c] < alpha
        b, c = b[rejects], c[rejects]

        def paired_power(drop: float) -> float:
            candidate_rate = baseline_rate - drop
            p_only_baseline = baseline_rate * (1.0 - candidate_rate)
            p_only_candidate = (1.0 - baseline_rate) * candidate_rate
            return float(_trinomial_pmf(b, c, n, p_only_baseline, p_only_candidate).sum())

        return paired_power
    kb, kc = (x.ravel() for x in np.meshgrid(np.arange(n + 1), np.arange(n_candidate + 1), indexing="ij"))
    if suite_level:
        rejects = farrington_manning_statistic(kb, n, kc, n_candidate, margin) > stats.norm.isf(alpha)
    else:
        rejects = unpaired_pvalue_table(n, n_candidate, margin).ravel() < alpha
    kb, kc = kb[rejects], kc[rejects]

    def unpaired_power(drop: float) -> float:
        candidate_rate = baseline_rate - drop
        return float((stats.binom.pmf(kb, n, baseline_rate) * stats.binom.pmf(kc, n_candidate, candidate_rate)).sum())

    return unpaired_power


# --------------------------------------------------------------------------------------------------- verdicts


@dataclasses.dataclass(frozen=True, kw_only=True)
class GateFigures:
    """What every gate comparison reports, a task's or a suite's (the summary table reads these). Rates and
    differences are fractions; difference = candidate - baseline."""

    paired: bool
    baseline_episodes: int
    candidate_episodes: int
    baseline_rate: float
    candidate_rate: float
    difference: float
    difference_low: float
    difference_high: float
    pvalue: float
    test: str
    verdict: str
    margin: float
    alpha: float
    strict: bool
    confidence: float
    detectable_drop: float | None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskVerdict(GateFigures):
    """One task's comparison, with its Holm-adjusted p-value when it is part of a suite."""

    task: str
    adjusted_pvalue: float
    discordant: tuple[int, int] | None  # (only baseline succeeded, only candidate succeeded) when paired


@dataclasses.dataclass(frozen=True, kw_only=True)
class SuiteVerdict(GateFigures):
    """The suite-level stratified test plus every task's Holm-adjusted verdict."""

    tasks: tuple[TaskVerdict, ...]

    @property
    def failed_tasks(self) -> list[str]:
        return [t.task for t in self.tasks if t.verdict == FAIL]

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tasks"] = [t.as_dict() for t in self.tasks]
        return d


def compare_task(baseline: TaskOutcomes, candidate: TaskOutcomes, *, alpha: float = DEFAULT_ALPHA,
                 margin: float = 0.0, strict: bool = False, confidence: float = 0.95,
                 paired: bool | None = None, adjusted_pvalue: float | None = None) -> TaskVerdict:
    """Gate one task. paired=None pairs by init state whenever the candidate's init states are a subset of the
    baseline's (the baseline's extra episodes are then left out), and falls back to the unpaired test otherwise.
    `adjusted_pvalue` (from Holm, see compare_suite) replaces the raw p-value in the verdict."""
    _check_settings(alpha, margin, confidence)
    if not baseline.outcomes:
        raise VlaBenchError(f"task {baseline.task}: the baseline has no episodes")
    if not candidate.outcomes:
        raise VlaBenchError(f"task {candidate.task}: the candidate has no episodes")
    use_pairs = can_pair(baseline, candidate) if paired is None else paired
    if use_pairs:
        counts = paired_counts(baseline, candidate)
        n = counts.pairs
        pvalue = float(paired_pvalues(counts.only_baseline, counts.only_candidate, n, margin))
        low, high = paired_difference_interval(counts.both, counts.only_candidate, counts.only_baseline,
                                               counts.neither, confidence)
        baseline_rate = (counts.both + counts.only_baseline) / n
        candidate_rate = (counts.both + counts.only_candidate) / n
        test = "exact McNemar (paired)" if margin == 0 else "exact unconditional Tango score (paired)"
        n_base = n_cand = n
        discordant = (counts.only_baseline, counts.only_candidate)
    else:
        n_base, n_cand = baseline.episodes, candidate.episodes
        pvalue = float(unpaired_pvalues(baseline.successes, n_base, candidate.successes, n_cand, margin))
        low, high = newcombe_difference_interval(candidate.successes, n_cand, baseline.successes, n_base, confidence)
        baseline_rate, candidate_rate = baseline.rate, candidate.rate
        test = "Boschloo exact (unpaired)" if margin == 0 else "exact unconditional Farrington-Manning (unpaired)"
        discordant = None
    decisive = pvalue if adjusted_pvalue is None else adjusted_pvalue
    code = int(verdict_codes(decisive, low, alpha, margin, strict))
    return TaskVerdict(
        task=candidate.task, paired=use_pairs, baseline_episodes=n_base, candidate_episodes=n_cand,
        baseline_rate=baseline_rate, candidate_rate=candidate_rate, difference=candidate_rate - baseline_rate,
        difference_low=float(low), difference_high=float(high), pvalue=pvalue, adjusted_pvalue=decisive, test=test,
        verdict=_CODES[code], margin=margin, alpha=alpha, strict=strict, confidence=confidence,
        detectable_drop=smallest_detectable_drop(baseline_rate, n_base, alpha=alpha, margin=margin, paired=use_pairs,
                                                 candidate_episodes=n_cand),
        discordant=discordant,
    )


def compare_suite(pairs: Sequence[tuple[TaskOutcomes, TaskOutcomes]], *, alpha: float = DEFAULT_ALPHA,
                  margin: float = 0.0, strict: bool = False, confidence: float = 0.95,
                  paired: bool | None = None) -> SuiteVerdict:
    """Gate a suite: per-task verdicts on Holm-adjusted p-values, plus the stratified suite-level test.

    The suite is paired when every task pairs (paired=None) -- mixing paired and unpaired strata in one statistic
    would need weights nobody could read off the summary.
    """
    _check_settings(alpha, margin, confidence)
    if not pairs:
        raise VlaBenchError("nothing to compare: the run has no tasks")
    use_pairs = all(can_pair(b, c) for b, c in pairs) if paired is None else paired
    raw = [compare_task(b, c, alpha=alpha, margin=margin, strict=strict, confidence=confidence, paired=use_pairs)
           for b, c in pairs]
    adjusted = holm_adjust([t.pvalue for t in raw])
    tasks = tuple(
        dataclasses.replace(t, adjusted_pvalue=p, verdict=_CODES[int(
            verdict_codes(p, t.difference_low, alpha, margin, strict))])
        for t, p in zip(raw, adjusted))
    suite = _paired_suite_test(pairs, margin, confidence) if use_pairs else \
        _unpaired_suite_test(pairs, margin, confidence)
    code = int(verdict_codes(suite["pvalue"], suite["difference_low"], alpha, margin, strict))
    return SuiteVerdict(
        tasks=tasks, paired=use_pairs, verdict=_CODES[code], margin=margin, alpha=alpha, strict=strict,
        confidence=confidence,
        detectable_drop=smallest_detectable_drop(suite["baseline_rate"], suite["baseline_episodes"], alpha=alpha,
                                                 margin=margin, paired=use_pairs,
                                                 candidate_episodes=suite["candidate_episodes"], suite_level=True),
        **suite)


def paired_suite_pvalue(per_task: Sequence[PairedCounts], margin: float) -> tuple[float, str]:
    """The suite-level paired test's one-sided p-value and name (see the module docstring)."""
    if margin == 0.0:
        only_baseline = sum(t.only_baseline for t in per_task)
        only_candidate = sum(t.only_candidate for t in per_task)
        return float(mcnemar_exact_pvalue(only_baseline, only_candidate)), \
            "exact McNemar on all pairs (CMH stratified by init state)"
    numerator = sum(t.only_baseline - t.only_candidate - t.pairs * margin for t in per_task)
    variance = sum(t.pairs * (2.0 * float(tango_constrained_rate(t.only_baseline, t.only_candidate, t.pairs, margin))
                              + margin * (1.0 - margin)) for t in per_task)
    return float(stats.norm.sf(float(_safe_ratio(numerator, math.sqrt(variance))))), \
        "stratified Tango score (paired, normal approximation)"


def unpaired_suite_pvalue(counts: Sequence[tuple[int, int, int, int]], margin: float) -> tuple[float, str]:
    """The suite-level unpaired test's one-sided p-value and name; counts: (baseline successes, baseline episodes,
    candidate successes, candidate episodes) per task."""
    if margin == 0.0:
        tables = [[[kb, nb - kb], [kc, nc - kc]] for kb, nb, kc, nc in counts]
        return cochran_mantel_haenszel(tables)["pvalue_greater"], \
            "Cochran-Mantel-Haenszel (unpaired, stratified by task)"
    # Stratified Farrington-Manning: task differences weighted like CMH (n_b n_c / (n_b + n_c)), each with its
    # variance at the restricted MLE on the null boundary.
    kb, nb, kc, nc = np.asarray(counts, dtype=float).T
    weight = nb * nc / (nb + nc)
    pc = _restricted_candidate_rate(kb, nb, kc, nc, margin)
    pb = pc + margin
    numerator = float(np.sum(weight * (kb / nb - kc / nc - margin)))
    variance = float(np.sum(weight * weight * (pb * (1 - pb) / nb + pc * (1 - pc) / nc)))
    return float(stats.norm.sf(float(_safe_ratio(numerator, math.sqrt(variance))))), \
        "stratified Farrington-Manning (unpaired, normal approximation)"


def _paired_suite_test(pairs, margin, confidence) -> dict:
    per_task = [paired_counts(b, c) for b, c in pairs]
    pvalue, test = paired_suite_pvalue(per_task, margin)
    total = functools.reduce(lambda x, y: x + y, per_task)
    n = total.pairs
    low, high = paired_difference_interval(total.both, total.only_candidate, total.only_baseline, total.neither,
                                           confidence)
    baseline_rate = (total.both + total.only_baseline) / n
    candidate_rate = (total.both + total.only_candidate) / n
    return dict(baseline_episodes=n, candidate_episodes=n, baseline_rate=baseline_rate,
                candidate_rate=candidate_rate, difference=candidate_rate - baseline_rate, difference_low=float(low),
                difference_high=float(high), pvalue=pvalue, test=test)


def _unpaired_suite_test(pairs, margin, confidence) -> dict:
    counts = [(b.successes, b.episodes, c.successes, c.episodes) for b, c in pairs]
    pvalue, test = unpaired_suite_pvalue(counts, margin)
    kb, nb, kc, nc = (sum(x) for x in zip(*counts))
    low, high = newcombe_difference_interval(kc, nc, kb, nb, confidence)
    return dict(baseline_episodes=nb, candidate_episodes=nc, baseline_rate=kb / nb, candidate_rate=kc / nc,
                difference=kc / nc - kb / nb, difference_low=float(low), difference_high=float(high),
                pvalue=float(pvalue), test=test)


def _check_settings(alpha: float, margin: float, confidence: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise VlaBenchError(f"alpha must be in (0, 1), got {alpha}")
    if not 0.0 <= margin < 1.0:
        raise VlaBenchError(f"the drop margin must be in [0, 1), got {margin}")
    if not 0.0 < confidence < 1.0:
        raise VlaBenchError(f"confidence must be in (0, 1), got {confidence}")


# ----------------------------------------------------------------------------------------------- curtailment


@dataclasses.dataclass(frozen=True)
class Curtailment:
    """Whether a verdict can no longer change, and if so which it is."""

    determined: bool
    verdict: str | None  # for thresholds: PASS or FAIL
    remaining: int


def meets_threshold(successes: int, episodes: int, threshold: float) -> bool:
    """The suite's pass rule for a threshold test: the point estimate successes / episodes meets the minimum
    (Threshold.passes, the one home of that rule)."""
    return episodes > 0 and Threshold(minimum=threshold).passes(successes / episodes)


def threshold_curtailment(successes: int, done: int, planned: int, threshold: float) -> Curtailment:
    """Is `meets_threshold` after `planned` episodes already fixed, given `successes` in the first `done`?

    The rule is monotone in the final number of successes, so it suffices that the two extremes (every remaining
    episode fails / succeeds) agree.
    """
    if not 0 <= successes <= done <= planned:
        raise ValueError(f"need 0 <= successes <= done <= planned, got {successes}, {done}, {planned}")
    remaining = planned - done
    worst = meets_threshold(successes, planned, threshold)
    best = meets_threshold(successes + remaining, planned, threshold)
    determined = worst == best
    return Curtailment(determined, (PASS if best else FAIL) if determined else None, remaining)


def gate_curtailment(baseline: TaskOutcomes, candidate_so_far: TaskOutcomes, planned_init_indices: Iterable[int], *,
                     alpha: float = DEFAULT_ALPHA, margin: float = 0.0, strict: bool = False,
                     confidence: float = 0.95, paired: bool | None = None) -> Curtailment:
    """Is compare_task's verdict on the planned candidate run already fixed by the episodes run so far?

    Every completion of the remaining episodes is evaluated with the very rule compare_task applies (vectorized):
    paired, the verdict depends on (both, only_baseline, only_candidate, neither), and the remaining init states
    can only add to these along a (remaining baseline successes + 1) x (remaining baseline failures + 1) grid;
    unpaired, on the candidate's final success count. Determined means every completion agrees, so no verdict ever
    changes; no monotonicity of p-values or intervals is assumed.
    """
    pvalue, ci_low, remaining = _completion_figures(baseline, candidate_so_far, planned_init_indices, margin=margin,
                                                    confidence=confidence, paired=paired)
    return _agreement(verdict_codes(pvalue, ci_low, alpha, margin, strict), remaining)


def suite_gate_curtailment(tasks: Sequence[tuple[TaskOutcomes, TaskOutcomes, Iterable[int]]], *,
                           alpha: float = DEFAULT_ALPHA, margin: float = 0.0, strict: bool = False,
                           confidence: float = 0.95, paired: bool | None = None) -> list[Curtailment]:
    """Per task of a suite (baseline, candidate so far, planned init indices): is its Holm-adjusted verdict in
    compare_suite already fixed? Tasks not started yet are passed with no episodes so far.

    Holm's procedure is monotone: lowering any p-value never un-rejects a task. So for each completion of a task's
    own episodes, its verdict lies between the verdicts it gets when every other task ends at its largest reachable
    p-value and when every other task ends at its smallest; the verdict is determined when all those agree. Exact
    like gate_curtailment (which is the one-task case), but early stops are rarer: while another task may still end
    anywhere, a task fails early only below alpha / (number of tasks).
    """
    if paired is None:
        paired = all(can_pair(b, TaskOutcomes(c.task, {i: True for i in planned})) for b, c, planned in tasks)
    figures = [_completion_figures(b, c, planned, margin=margin, confidence=confidence, paired=paired)
               for b, c, planned in tasks]
    smallest = np.array([p.min() for p, _, _ in figures])
    largest = np.array([p.max() for p, _, _ in figures])
    results = []
    for index, (pvalue, ci_low, remaining) in enumerate(figures):
        others = np.arange(len(figures)) != index
        codes = [verdict_codes(_holm_adjusted_own(pvalue, extreme[others]), ci_low, alpha, margin, strict)
                 for extreme in (smallest, largest)]
        results.append(_agreement(np.concatenate([np.ravel(c) for c in codes]), remaining))
    return results


def _holm_adjusted_own(own, others):
    """Holm-adjusted p-value of one task for every value in `own`, the other tasks' p-values being `others`:
    max(the running max of (m - k + 1) p_(k) over the others sorted below it, (m - r + 1) own), r its rank."""
    own = np.asarray(own, dtype=float)
    others = np.sort(np.asarray(others, dtype=float))
    m = others.size + 1
    running = np.maximum.accumulate((m - np.arange(others.size)) * others) if others.size else np.zeros(0)
    below = np.searchsorted(others, own, side="left")  # others strictly below own come first in the order
    before = np.where(below > 0, running[np.maximum(below - 1, 0)] if others.size else 0.0, 0.0)
    return np.minimum(1.0, np.maximum(before, (m - below) * own))


def _completion_figures(baseline, candidate_so_far, planned_init_indices, *, margin, confidence, paired):
    """(p-values, interval low ends, remaining count) over every completion of the candidate's planned run."""
    planned = sorted(set(int(i) for i in planned_init_indices))
    extra = sorted(set(candidate_so_far.outcomes) - set(planned))
    if extra:
        raise ValueError(f"episodes {extra[:10]} were run but are not planned")
    remaining = [i for i in planned if i not in candidate_so_far.outcomes]
    planned_candidate = TaskOutcomes(candidate_so_far.task, {i: True for i in planned})
    use_pairs = can_pair(baseline, planned_candidate) if paired is None else paired
    if not use_pairs:
        successes = candidate_so_far.successes + np.arange(len(remaining) + 1)
        return (*_unpaired_task_figures(baseline.successes, baseline.episodes, successes, len(planned),
                                        margin=margin, confidence=confidence), len(remaining))
    counts = paired_counts(baseline, candidate_so_far) if candidate_so_far.outcomes else PairedCounts(0, 0, 0, 0)
    remaining_baseline_successes = sum(baseline.outcomes[i] for i in remaining)
    remaining_baseline_failures = len(remaining) - remaining_baseline_successes
    # s1: candidate successes among remaining init states the baseline solved; s0: among those it failed
    s1, s0 = (x.ravel() for x in np.meshgrid(np.arange(remaining_baseline_successes + 1),
                                             np.arange(remaining_baseline_failures + 1), indexing="ij"))
    return (*_paired_task_figures(counts.both + s1, counts.only_baseline + remaining_baseline_successes - s1,
                                  counts.only_candidate + s0, counts.neither + remaining_baseline_failures - s0,
                                  margin=margin, confidence=confidence), len(remaining))


def _agreement(codes, remaining: int) -> Curtailment:
    codes = np.unique(np.asarray(codes))
    determined = codes.size == 1
    return Curtailment(determined, _CODES[int(codes[0])] if determined else None, remaining)


# ------------------------------------------------------------------------------------------ sequential gate


def obrien_fleming_spending(information: float, alpha: float) -> float:
    """Lan-DeMets O'Brien-Fleming-type spending function for a one-sided level-alpha test:
    alpha(t) = 2 - 2 Phi(z_{1-alpha/2} / sqrt(t)); it spends almost nothing early and alpha(1) = alpha."""
    if information <= 0:
        return 0.0
    t = min(information, 1.0)
    return float(2.0 * stats.norm.sf(stats.norm.isf(alpha / 2.0) / math.sqrt(t)))


@dataclasses.dataclass(frozen=True)
class SequentialDesign:
    """A group-sequential paired gate (margin 0): look after each count in `looks` (the last is the planned total).

    At look k the statistic is the number of "only baseline succeeded" pairs among the D_k discordant pairs so far.
    Under H0 (no drop on any init state) it is a fair-coin walk given the discordant counts, so the boundary u_k is
    the smallest count whose exact probability of a first crossing, added to what earlier looks spent, stays within
    alpha(t_k), t_k = episodes so far / planned episodes. That makes the type-I error <= alpha exactly (discreteness
    only makes it smaller). `futility_from`: from that information fraction on, an interim look where the candidate
    is not behind (only_baseline <= only_candidate) stops the task without failing; futility stops are non-binding
    (they can only remove rejections), so they cost power, never type-I error.
    """

    looks: tuple[int, ...]
    alpha: float = DEFAULT_ALPHA
    futility_from: float | None = None

    def __post_init__(self):
        looks = tuple(int(x) for x in self.looks)
        if not looks or any(b <= a for a, b in zip(looks, looks[1:])) or looks[0] < 1:
            raise VlaBenchError(f"sequential looks must be increasing positive episode counts, got {self.looks}")
        object.__setattr__(self, "looks", looks)

    @property
    def episodes(self) -> int:
        return self.looks[-1]

    @classmethod
    def evenly(cls, episodes: int, looks: int, **kwargs) -> "SequentialDesign":
        counts = sorted({max(1, round(episodes * (k + 1) / looks)) for k in range(looks)})
        return cls(tuple(counts), **kwargs)


@dataclasses.dataclass(frozen=True)
class SequentialResult:
    verdict: str  # FAIL when a boundary was crossed; otherwise PASS / INCONCLUSIVE from the interval so far
    stopped_at: int  # episodes used
    look: int  # 1-based index of the look that stopped
    reason: str  # "efficacy" (regression found), "futility" or "final"
    boundaries: tuple[int, ...]  # boundary on only_baseline at each look taken


def sequential_boundaries(discordant_at_looks: Sequence[int], information: Sequence[float],
                          alpha: float) -> tuple[int, ...]:
    """Exact boundaries u_1..u_k for the fair-coin walk observed with the given discordant counts (see
    SequentialDesign); u > D means no crossing is possible at that look."""
    return _boundaries_cached(tuple(int(d) for d in discordant_at_looks), tuple(float(t) for t in information),
                              float(alpha))


@functools.lru_cache(maxsize=200_000)
def _boundaries_cached(discordant: tuple[int, ...], information: tuple[float, ...], alpha: float) -> tuple[int, ...]:
    if len(discordant) > 1:
        earlier = _boundaries_cached(discordant[:-1], information[:-1], alpha)
    else:
        earlier = ()
    survivors, spent = _walk_survivors(discordant[:-1], earlier)
    step = discordant[-1] - (discordant[-2] if len(discordant) > 1 else 0)
    distribution = np.convolve(survivors, stats.binom.pmf(np.arange(step + 1), step, 0.5))
    allowed = obrien_fleming_spending(information[-1], alpha) - spent
    tails = np.cumsum(distribution[::-1])[::-1]  # tails[u] = P(count >= u, no earlier crossing)
    feasible = np.flatnonzero(tails <= allowed + 1e-12)
    boundary = int(feasible[0]) if feasible.size else distribution.size
    return earlier + (boundary,)


def _walk_survivors(discordant: tuple[int, ...], boundaries: tuple[int, ...]):
    """Distribution of the count over paths that have not crossed, and the probability already spent."""
    distribution = np.array([1.0])
    previous, spent = 0, 0.0
    for d, u in zip(discordant, boundaries):
        step = d - previous
        distribution = np.convolve(distribution, stats.binom.pmf(np.arange(step + 1), step, 0.5))
        spent += distribution[u:].sum()
        distribution[u:] = 0.0
        previous = d
    return distribution, spent


def sequential_gate(baseline: TaskOutcomes, candidate: TaskOutcomes, design: SequentialDesign, *,
                    confidence: float = 0.95, strict: bool = False) -> SequentialResult:
    """Run the sequential gate over the candidate's episodes in init-state order (episode i = init state i, as the
    runner produces them), stopping at the first look that decides."""
    order = sorted(candidate.outcomes)[: design.episodes]
    if len(order) < design.looks[0]:
        raise VlaBenchError(f"task {candidate.task}: {len(order)} episodes, fewer than the first look "
                            f"({design.looks[0]})")
    missing = [i for i in order if i not in baseline.outcomes]
    if missing:
        raise VlaBenchError(f"task {candidate.task}: the baseline has no episodes for init states {missing[:10]}")
    baseline_flags = np.array([baseline.outcomes[i] for i in order])
    candidate_flags = np.array([candidate.outcomes[i] for i in order])
    only_baseline = np.cumsum(baseline_flags & ~candidate_flags)
    only_candidate = np.cumsum(~baseline_flags & candidate_flags)
    stop, look, reason, boundaries = sequential_decision(only_baseline, only_candidate, design)
    if reason == "efficacy":
        verdict = FAIL
    else:
        counts = paired_counts(baseline, TaskOutcomes(candidate.task, {i: candidate.outcomes[i] for i in order[:stop]}))
        low, _ = paired_difference_interval(counts.both, counts.only_candidate, counts.only_baseline, counts.neither,
                                            confidence)
        verdict = _CODES[int(verdict_codes(1.0, low, design.alpha, 0.0, strict))]
    return SequentialResult(verdict, stop, look, reason, boundaries)


def sequential_decision(only_baseline_cumulative, only_candidate_cumulative, design: SequentialDesign):
    """(episodes used, look, reason, boundaries) for one sequence of cumulative discordant counts (entry i: after
    episode i + 1), the core of sequential_gate without the outcome bookkeeping, for simulations."""
    looks = [k for k in design.looks if k <= len(only_baseline_cumulative)]
    discordant, information = [], []
    boundaries: tuple[int, ...] = ()
    for index, episodes in enumerate(looks):
        b = int(only_baseline_cumulative[episodes - 1])
        c = int(only_candidate_cumulative[episodes - 1])
        discordant.append(b + c)
        information.append(episodes / design.episodes)
        boundaries = sequential_boundaries(discordant, information, design.alpha)
        if b >= boundaries[-1]:
            return episodes, index + 1, "efficacy", boundaries
        final = index == len(design.looks) - 1
        if (not final and design.futility_from is not None and information[-1] >= design.futility_from
                and b <= c):
            return episodes, index + 1, "futility", boundaries
    return looks[-1], len(looks), "final", boundaries


# ----------------------------------------------------------------------------------- continuous proxy metrics


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


# --------------------------------------------------------------------------------- operating characteristics


def simulate_pairs(rng: np.random.Generator, replicates: int, episodes: int, baseline_rate: float,
                   candidate_rate: float, correlation: float = 0.0):
    """Paired outcomes (baseline, candidate) as two bool arrays (replicates, episodes), with the given phi
    correlation between the checkpoints on an init state (clipped to what the rates allow)."""
    spread = math.sqrt(baseline_rate * (1 - baseline_rate) * candidate_rate * (1 - candidate_rate))
    p_both = baseline_rate * candidate_rate + correlation * spread
    p_both = min(max(p_both, max(0.0, baseline_rate + candidate_rate - 1.0)), min(baseline_rate, candidate_rate))
    cells = np.array([p_both, baseline_rate - p_both, candidate_rate - p_both,
                      1.0 - baseline_rate - candidate_rate + p_both])
    draws = rng.random((replicates, episodes))
    kind = np.searchsorted(np.cumsum(cells)[:-1], draws, side="right")
    baseline = (kind == 0) | (kind == 1)
    candidate = (kind == 0) | (kind == 2)
    return baseline, candidate


def _stopping_episode(baseline_row, candidate_row, settings) -> int:
    """Episodes curtailment needs before the gate verdict is fixed: determinedness only grows with more episodes
    (the completions shrink), so a bisection over the prefix length finds the first determined prefix."""
    n = baseline_row.size
    baseline = TaskOutcomes("t", dict(enumerate(baseline_row.tolist())))
    planned = range(n)

    def determined(k: int) -> bool:
        so_far = TaskOutcomes("t", dict(enumerate(candidate_row[:k].tolist())))
        return gate_curtailment(baseline, so_far, planned, **settings).determined

    low, high = 0, n
    while low < high:
        mid = (low + high) // 2
        if determined(mid):
            high = mid
        else:
            low = mid + 1
    return low


def _threshold_stopping_episode(row, threshold) -> int:
    n = row.size
    successes = np.r_[0, np.cumsum(row)]
    for done in range(n + 1):
        if threshold_curtailment(int(successes[done]), done, n, threshold).determined:
            return done
    return n


def simulate_operating_characteristics(*, episodes: int = 50, baseline_rate: float = 0.8,
                                       drops: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.3),
                                       correlation: float = 0.0, alpha: float = DEFAULT_ALPHA,
                                       looks: int = 5, futility_from: float | None = 0.5,
                                       threshold: float | None = None, replicates: int = 2000,
                                       curtailment_replicates: int | None = None, seed: int = 0) -> list[dict]:
    """Monte Carlo operating characteristics of the per-task paired gate (margin 0) at each true drop.

    Rows: drop, candidate_rate, fixed_reject (the exact McNemar gate: type-I error at drop 0, power otherwise),
    sequential_reject (the group-sequential gate), mean episodes of the fixed run, of a run curtailed at the moment
    the fixed gate's verdict is determined (same verdicts by construction), and of the sequential gate; and, when a
    `threshold` is given, the mean episodes of a threshold test on the candidate under curtailment.
    Each rate comes with its Monte Carlo standard error.
    """
    rng = np.random.default_rng(seed)
    design = SequentialDesign.evenly(episodes, looks, alpha=alpha, futility_from=futility_from)
    curtailment_replicates = min(replicates, 300) if curtailment_replicates is None else curtailment_replicates
    settings = dict(alpha=alpha, margin=0.0, strict=False)
    rows = []
    for drop in drops:
        candidate_rate = baseline_rate - drop
        baseline, candidate = simulate_pairs(rng, replicates, episodes, baseline_rate, candidate_rate, correlation)
        only_baseline = np.cumsum(baseline & ~candidate, axis=1)
        only_candidate = np.cumsum(~baseline & candidate, axis=1)
        fixed_reject = np.asarray(mcnemar_exact_pvalue(only_baseline[:, -1], only_candidate[:, -1])) < alpha
        decisions = [sequential_decision(only_baseline[r], only_candidate[r], design) for r in range(replicates)]
        sequential_reject = np.array([d[2] == "efficacy" for d in decisions])
        sequential_episodes = np.array([d[0] for d in decisions])
        curtailed = np.array([_stopping_episode(baseline[r], candidate[r], settings)
                              for r in range(curtailment_replicates)])
        row = {
            "drop": drop,
            "candidate_rate": candidate_rate,
            "fixed_reject": float(fixed_reject.mean()),
            "fixed_reject_se": _standard_error(fixed_reject),
            "sequential_reject": float(sequential_reject.mean()),
            "sequential_reject_se": _standard_error(sequential_reject),
            "episodes_fixed": episodes,
            "episodes_curtailed": float(curtailed.mean()),
            "episodes_sequential": float(sequential_episodes.mean()),
        }
        if threshold is not None:
            row["threshold"] = threshold
            row["episodes_threshold_curtailed"] = float(np.mean(
                [_threshold_stopping_episode(candidate[r], threshold) for r in range(curtailment_replicates)]))
        rows.append(row)
    return rows


def format_operating_characteristics(rows: list[dict]) -> str:
    """A plain-text table of simulate_operating_characteristics' rows, for reports."""
    header = ["drop", "cand", "fixed reject", "seq reject", "eps fixed", "eps curtailed", "eps seq"]
    with_threshold = rows and "threshold" in rows[0]
    if with_threshold:
        header.append(f"eps thr>={rows[0]['threshold']:.2f}")
    lines = [" | ".join(header)]
    for r in rows:
        cells = [f"{r['drop']:.2f}", f"{r['candidate_rate']:.2f}",
                 f"{r['fixed_reject']:.3f}±{r['fixed_reject_se']:.3f}",
                 f"{r['sequential_reject']:.3f}±{r['sequential_reject_se']:.3f}", f"{r['episodes_fixed']}",
                 f"{r['episodes_curtailed']:.1f}", f"{r['episodes_sequential']:.1f}"]
        if with_threshold:
            cells.append(f"{r['episodes_threshold_curtailed']:.1f}")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- helpers


def _standard_error(flags) -> float:
    flags = np.asarray(flags, dtype=float)
    return float(math.sqrt(flags.mean() * (1 - flags.mean()) / flags.size)) if flags.size else float("nan")


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
