"""Regression gating of closed-loop runs: stored episodes -> baseline runs, gate settings, curtailment rules.

The statistics live in metrics/gate.py and the JSON files in baselines.py; this module connects them to the
results store and to one evaluation, for both the pytest plugin and `vla-bench gate`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

from .baselines import BaselineRun, check_comparable, make_baseline
from .metrics.gate import (FAIL, INCONCLUSIVE, TaskOutcomes, compare_task, gate_curtailment, parse_fail_spec,
                           threshold_curtailment)
from .protocol import Protocol
from .results import EpisodeRecord


@dataclasses.dataclass(frozen=True)
class GateSettings:
    alpha: float = 0.05
    margin: float = 0.0  # a drop up to this (fraction) is tolerated: --vla-compare-fail=drop:5pp
    strict: bool = False  # inconclusive counts as failure (non-inferiority mode)

    @classmethod
    def from_options(cls, alpha: float, fail_spec: str | None, strict: bool) -> "GateSettings":
        return cls(alpha=alpha, margin=parse_fail_spec(fail_spec), strict=strict)

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


def stop_rule(planned: range, threshold=None, baseline: TaskOutcomes | None = None,
              settings: GateSettings | None = None) -> Callable[[dict[int, bool]], bool]:
    """The curtailment rule of one task: True once neither the threshold verdict (a number threshold) nor the gate
    verdict can change, whatever the remaining episodes give. Exact: it never changes a verdict."""
    def determined(outcomes: dict[int, bool]) -> bool:
        if isinstance(threshold, (int, float)):
            if not threshold_curtailment(sum(outcomes.values()), len(outcomes), len(planned), threshold).determined:
                return False
        elif threshold is not None:
            return False  # a [low, high] range: no curtailment rule, run everything
        if baseline is not None:
            candidate = TaskOutcomes(baseline.task, dict(outcomes))
            if not gate_curtailment(baseline, candidate, planned, **settings.kwargs()).determined:
                return False
        return True
    return determined


def gate_task(baseline: BaselineRun, task: str, outcomes: Mapping[int, bool], settings: GateSettings):
    return compare_task(baseline.outcomes(task), TaskOutcomes(task, dict(outcomes)), **settings.kwargs())
