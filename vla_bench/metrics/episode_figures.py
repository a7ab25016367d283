"""Action statistics of closed-loop episodes and of demonstrations, and their per-task summary.

Per episode (a (T, 7) LIBERO action array: OSC_POSE deltas a[0:6] in [-1, 1], gripper a[6], -1 open / +1 close):
- arm_magnitude: the mean L2 norm of the arm action a[0:6];
- near_zero: the fraction of steps whose six arm values all lie inside `ARM_DEAD_ZONE`;
- gripper_switches: how often the sign of the gripper command changes.

The same functions read executed episodes (engine/trace.py computes them step by step and agrees with
`action_figures`) and demonstrations (the summary shows both side by side), so a model that collapses towards "no
motion" or chatters its gripper stands out against the data it learned from.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Iterable

import numpy as np

from .action_metrics import dead_zone_from_stats

#: LIBERO's action space: every arm dim in [-1, 1] (action_spec); the bounds the dead zone is read from
ARM_LOW, ARM_HIGH = -np.ones(6), np.ones(6)
#: "no motion" per arm dim: the open-loop near-zero metric's own rule (`dead_zone_from_stats`) over LIBERO's action
#: range, i.e. two of OpenVLA's 256 action bins, 4/255 ~ 0.0157. One rule for open and closed loop, so the figures
#: compare, and one zone for executed and demonstrated actions.
ARM_DEAD_ZONE = dead_zone_from_stats(ARM_LOW, ARM_HIGH)


@dataclasses.dataclass(frozen=True)
class ActionFigures:
    """The action statistics of one episode, or their means over several (then gripper_switches is a mean too)."""

    arm_magnitude: float
    near_zero: float
    gripper_switches: float


def arm_norms(actions) -> np.ndarray:
    """The L2 norm of each step's arm action a[0:6]."""
    return np.linalg.norm(np.asarray(actions, dtype=np.float64)[:, :6], axis=1)


def near_zero_steps(actions) -> np.ndarray:
    """Per step: True when all six arm values are inside ARM_DEAD_ZONE."""
    arm = np.asarray(actions, dtype=np.float64)[:, :6]
    return np.all(np.abs(arm) <= ARM_DEAD_ZONE, axis=1)


def gripper_switches(commands) -> int:
    """Sign changes of the gripper commands. A zero command has no sign and is skipped: a model passing through
    exactly 0 on its way from open to close has switched once, not twice."""
    signs = np.sign(np.asarray(commands, dtype=np.float64))
    signs = signs[signs != 0]
    return int(np.count_nonzero(signs[1:] != signs[:-1]))


def action_figures(actions) -> ActionFigures | None:
    """The statistics of a (T, 7) action array (an executed episode, or a demonstration); None when T = 0."""
    actions = np.asarray(actions, dtype=np.float64).reshape(-1, 7)
    if not len(actions):
        return None
    return ActionFigures(float(arm_norms(actions).mean()), float(near_zero_steps(actions).mean()),
                         gripper_switches(actions[:, 6]))


def mean_figures(figures: Iterable[ActionFigures | None]) -> ActionFigures | None:
    """The per-field mean of several episodes' figures (None entries left out); None when none is left."""
    figures = [f for f in figures if f is not None]
    if not figures:
        return None
    return ActionFigures(*(float(np.mean([getattr(f, field.name) for f in figures]))
                           for field in dataclasses.fields(ActionFigures)))


@dataclasses.dataclass(frozen=True)
class TaskFigures:
    """One task's figures from its stored rows: the mean action figures over measured episodes that carry them,
    and how its failed episodes stopped ({stop reason: episodes})."""

    actions: ActionFigures | None
    stop_reasons: dict

    def describe_stops(self) -> str:
        """'stalled 3, out of steps 2' (most frequent first); '-' when no failure has a recorded reason."""
        ranked = sorted(self.stop_reasons.items(), key=lambda item: (-item[1], item[0]))
        return ", ".join(f"{reason} {n}" for reason, n in ranked) or "-"


def task_figures(records) -> TaskFigures:
    """From EpisodeRecord-like rows (fields error, success, arm_magnitude, near_zero, gripper_switches,
    stop_reason): rows with an error are not measurements and are left out; rows written before these fields
    existed (None) count in neither part."""
    measured = [r for r in records if r.error is None]
    actions = mean_figures(ActionFigures(r.arm_magnitude, r.near_zero, r.gripper_switches) for r in measured
                           if None not in (r.arm_magnitude, r.near_zero, r.gripper_switches))
    stops = collections.Counter(r.stop_reason for r in measured if not r.success and r.stop_reason is not None)
    return TaskFigures(actions, dict(stops))
