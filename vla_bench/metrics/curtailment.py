"""Curtailment: stop a task's episodes once no remaining outcome can change its verdict.

Curtailment is deterministic and exact: a task's verdict is declared early only when every possible outcome of the
remaining episodes gives the same final verdict, so it never changes a verdict (the tests run both ways):
`gate_curtailment` for one task's compare_task verdict, `suite_gate_curtailment` for Holm-adjusted verdicts within a
suite, `threshold_curtailment` for the suite's threshold rule (`meets_threshold`). The sequential gate is a
different, optional test (group-sequential, O'Brien-Fleming-type alpha spending).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np

from ..options import DEFAULT_ALPHA
from ..thresholds import Threshold
from .verdicts import (_CODES, FAIL, PASS, PairedCounts, TaskOutcomes, _paired_task_figures, _unpaired_task_figures,
                       can_pair, paired_counts, verdict_codes)

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
