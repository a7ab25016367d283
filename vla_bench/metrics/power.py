"""Power of the gate's tests: the smallest drop a run of this size can detect.

The smallest detectable drop of a test is the smallest true drop (candidate rate = baseline rate - drop, baseline
rate = the observed one) that this test, at this alpha and this many episodes, rejects with probability >= `power`
(80% by default), computed exactly from the test's rejection region, assuming the two checkpoints' outcomes are
independent given the init state. Positively correlated checkpoints (the usual case) make paired tests more powerful,
so the figure is a conservative guide. None when even a drop to 0% would not reach that power.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
from scipy import stats

from ..options import DEFAULT_ALPHA
from .exact_tests import (_paired_sample_space, _trinomial_pmf, farrington_manning_statistic,
                          mcnemar_exact_pvalue, paired_margin_pvalue_table, tango_statistic, unpaired_pvalue_table)

DEFAULT_POWER = 0.8

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
