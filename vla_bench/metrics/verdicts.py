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

The tests are in vla_bench/metrics/exact_tests.py, the detectable drop in power.py, early stopping in
curtailment.py and sequential.py.

Intervals: Wilson on each rate, Newcombe's paired (or unpaired) hybrid score interval on each difference.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

from ..errors import VlaBenchError
from ..options import DEFAULT_ALPHA
from .exact_tests import (_restricted_candidate_rate, _safe_ratio, cochran_mantel_haenszel, holm_adjust,
                          mcnemar_exact_pvalue, paired_pvalues, tango_constrained_rate, unpaired_pvalues)
from .intervals import newcombe_difference_interval, paired_difference_interval
from .power import smallest_detectable_drop

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"
_CODES = {0: PASS, 1: INCONCLUSIVE, 2: FAIL}

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
