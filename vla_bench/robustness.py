"""Robustness suites (LIBERO-PRO): a checkpoint's rate on a perturbed task beside its rate on the unperturbed one,
and the drop between them with its 95% interval.

The statistics are the regression gate's (metrics/verdicts.py compare_task), with the unperturbed task as the baseline
and the perturbed one as the candidate: paired by init state (Newcombe's paired interval, exact McNemar) when the
two tasks start from the same init states, unpaired otherwise (Newcombe's hybrid score interval, Boschloo's exact
test). LIBERO-PRO ships its own init states for every variant, sampled afresh (objects and robot joints differ from
the base suite's by centimetres), so in the installed package no family pairs and the drop is unpaired; the pairing
is decided from the init-state arrays themselves, not assumed from the family.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .metrics.verdicts import TaskOutcomes, can_pair, compare_task
from .suites import split_robustness_suite


@dataclasses.dataclass(frozen=True)
class Drop:
    """Unperturbed minus perturbed success rate (positive: the perturbation hurts), as fractions."""

    base_rate: float
    base_episodes: int
    perturbed_rate: float
    perturbed_episodes: int
    drop: float
    low: float  # the 95% interval on the drop
    high: float
    paired: bool
    pvalue: float  # one-sided: the perturbed rate is lower
    test: str


def robustness_drop(base: TaskOutcomes, perturbed: TaskOutcomes, paired: bool,
                    confidence: float = 0.95) -> Drop:
    """The drop from `base` to `perturbed` outcomes ({init index: success}); `paired` says whether the two tasks'
    init states are the same (then episodes pair by init index, where every perturbed index has a base episode)."""
    use_pairs = bool(paired) and can_pair(base, perturbed)
    v = compare_task(base, perturbed, paired=use_pairs, confidence=confidence)
    # compare_task reports candidate - baseline; the drop is its negation, and so is its interval, ends swapped
    # (+ 0.0 turns a negated 0 into 0, which tables would print as "-0.0%")
    return Drop(base_rate=v.baseline_rate, base_episodes=v.baseline_episodes, perturbed_rate=v.candidate_rate,
                perturbed_episodes=v.candidate_episodes, drop=-v.difference + 0.0, low=-v.difference_high + 0.0,
                high=-v.difference_low + 0.0, paired=use_pairs, pvalue=v.pvalue, test=v.test)


def init_states_pair(base_states, perturbed_states) -> bool:
    """Two tasks' episodes pair by init index when their init states are the same arrays."""
    a, b = np.asarray(base_states), np.asarray(perturbed_states)
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=0.0, atol=1e-9))


@dataclasses.dataclass
class RobustnessResult:
    """One (checkpoint, robustness suite, task): both TaskResults and the drop."""

    suite: str  # e.g. libero_goal_lan
    task_index: int
    checkpoint: str
    base: object  # TaskResult on the unperturbed suite
    perturbed: object  # TaskResult on `suite`
    drop: Drop

    @property
    def base_suite(self) -> str:
        return split_robustness_suite(self.suite)[0]

    @property
    def family(self) -> str:
        return split_robustness_suite(self.suite)[1]

    @property
    def task_id(self) -> str:
        return f"task{self.task_index + 1}"

    @property
    def passed(self) -> bool | None:
        """The perturbed task meets its threshold (the drop is reported, not gated)."""
        return self.perturbed.passed


def drop_of(base_result, perturbed_result, paired: bool) -> Drop:
    """The Drop between two TaskResults of the same task."""
    return robustness_drop(TaskOutcomes(base_result.task_id, base_result.outcomes()),
                           TaskOutcomes(perturbed_result.task_id, perturbed_result.outcomes()), paired)
