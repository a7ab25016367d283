"""The regression gate of closed-loop runs: stored episodes -> baseline runs, gate settings, stop rules, verdicts.

The statistics live in vla_bench/metrics/ (verdicts, exact tests, curtailment, sequential design) and the JSON files
in baselines.py; this module connects them to the results store and to one evaluation, for both the pytest plugin
and `vla-bench gate`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

from .baselines import BaselineRun, check_comparable, make_baseline
from .errors import VlaBenchError
from .metrics.curtailment import gate_curtailment, threshold_curtailment
from .metrics.sequential import SequentialDesign, sequential_gate
from .metrics.verdicts import FAIL, INCONCLUSIVE, TaskOutcomes, compare_task, parse_fail_spec
from .options import DEFAULT_ALPHA
from .protocol import Protocol
from .results import EpisodeRecord
from .thresholds import Threshold


@dataclasses.dataclass(frozen=True)
class GateSettings:
    alpha: float = DEFAULT_ALPHA
    margin: float = 0.0  # a drop up to this (fraction) is tolerated: --vla-compare-fail=drop:5pp
    strict: bool = False  # inconclusive counts as failure (non-inferiority mode)
    looks: int = 0  # > 0: the group-sequential gate with this many equally spaced looks (--vla-sequential)

    @classmethod
    def from_options(cls, alpha: float, fail_spec: str | None, strict: bool, looks: int = 0) -> "GateSettings":
        settings = cls(alpha=alpha, margin=parse_fail_spec(fail_spec), strict=strict, looks=looks or 0)
        if settings.looks and settings.margin:
            raise VlaBenchError("--vla-sequential tests for any drop (margin 0); drop --vla-compare-fail or it")
        return settings

    def design(self, episodes: int) -> SequentialDesign:
        """Equally spaced looks; from half the episodes on, a look where the candidate is not behind stops too."""
        return SequentialDesign.evenly(episodes, self.looks, alpha=self.alpha, futility_from=0.5)

    def kwargs(self) -> dict:
        return dict(alpha=self.alpha, margin=self.margin, strict=self.strict)

    def fails(self, verdict: str) -> bool:
        return verdict == FAIL or (self.strict and verdict == INCONCLUSIVE)


def run_from_records(name: str, protocol: Protocol, checkpoint: str, identity: str, versions: Mapping,
                     tasks: Mapping[str, list[EpisodeRecord]]) -> BaselineRun:
    """A run's measured episodes (errors left out: they are not outcomes) in the baseline format."""
    outcomes = {task: {r.init_index: r.success for r in records if r.error is None}
                for task, records in tasks.items()}
    return make_baseline(name, suite=protocol.suite, protocol=protocol.as_dict(), protocol_key=protocol.key(),
                         checkpoint_name=checkpoint, checkpoint_identity=identity, versions=versions,
                         tasks=outcomes)


def check_protocol_matches(baseline: BaselineRun, protocol: Protocol, task: str, planned: range) -> None:
    """Before any episode runs: the baseline must have this suite, protocol, task and init states."""
    planned_run = make_baseline("candidate", suite=protocol.suite, protocol=protocol.as_dict(),
                                protocol_key=protocol.key(), checkpoint_name="-", checkpoint_identity="-",
                                versions={}, tasks={task: {i: True for i in planned}})
    check_comparable(baseline, planned_run)


def _prefix(outcomes: Mapping[int, bool]) -> dict[int, bool]:
    """The outcomes of init states 0, 1, ... up to the first one not finished yet (workers finish out of order;
    the sequential gate reads episodes in init-state order)."""
    n = 0
    while n in outcomes:
        n += 1
    return {i: outcomes[i] for i in range(n)}


def sequential_result(baseline: TaskOutcomes, outcomes: Mapping[int, bool], settings: GateSettings, episodes: int):
    prefix = _prefix(outcomes)
    design = settings.design(episodes)
    if len(prefix) < design.looks[0]:
        return None
    return sequential_gate(baseline, TaskOutcomes(baseline.task, prefix), design, strict=settings.strict)


def stop_rule(planned: range, threshold: Threshold | None = None, baseline: TaskOutcomes | None = None,
              settings: GateSettings | None = None, curtail: bool = True) -> Callable[[dict[int, bool]], bool]:
    """When a task may stop early: with `curtail`, once neither the threshold verdict (a number threshold) nor the
    gate verdict can change, whatever the remaining episodes give (exact: it never changes a verdict); with a
    sequential gate, once a look decides (then the threshold must be fixed too, when curtailing)."""
    sequential = baseline is not None and settings is not None and settings.looks > 0

    def determined(outcomes: dict[int, bool]) -> bool:
        if curtail:
            if threshold is not None and threshold.is_minimum:
                if not threshold_curtailment(sum(outcomes.values()), len(outcomes), len(planned),
                                             threshold.minimum).determined:
                    return False
            elif threshold is not None:
                return False  # a [low, high] range: no curtailment rule, run everything
        if sequential:
            result = sequential_result(baseline, outcomes, settings, len(planned))
            return result is not None and result.reason != "final"
        if not curtail:
            return False
        if baseline is not None:
            candidate = TaskOutcomes(baseline.task, dict(outcomes))
            if not gate_curtailment(baseline, candidate, planned, **settings.kwargs()).determined:
                return False
        return True
    return determined


def gate_task(baseline: BaselineRun, task: str, outcomes: Mapping[int, bool], settings: GateSettings,
              episodes: int | None = None):
    """The task's TaskVerdict. With a sequential gate, its verdict is the sequential test's, on the episodes up to
    where it stopped; the figures beside it (rates, interval, p) are the fixed-design ones on those episodes."""
    base = baseline.outcomes(task)
    if settings.looks and episodes:
        result = sequential_result(base, outcomes, settings, episodes)
        if result is not None:
            used = dict(list(_prefix(outcomes).items())[: result.stopped_at])
            fixed = compare_task(base, TaskOutcomes(task, used), **settings.kwargs())
            return dataclasses.replace(fixed, verdict=result.verdict, test=(
                f"group-sequential McNemar, O'Brien-Fleming ({result.reason} at look {result.look}, "
                f"{result.stopped_at} episodes)"))
    return compare_task(base, TaskOutcomes(task, dict(outcomes)), **settings.kwargs())
