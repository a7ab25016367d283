"""Execution rules, their one home for training and evaluation: action repeat (a temporally subsampled policy) and
action chunks (a policy that predicts H actions at once and is asked again after `replan_steps` of them).

A model fine-tuned with `vla-bench finetune --action-repeat k` learned one action per window of k env steps: the
window's arm deltas summed, its last gripper command (finetune/data.py: `aggregate_steps`). Evaluation replays that
by `execution_rule(k)`: query the model once every k env steps per environment, and execute
[a[0:6] * arm_scale, a[6] * gripper_scale] = [a[0:6] / k, a[6]] for the k steps, so the arm moves by the window's
sum in total and the gripper holds the window's last command.

An action chunk is the general case: the model answers with H actions per observation, evaluation executes the
first `replan_steps` of them (all H when unset; openpi's LIBERO example executes 5 of 10) and then asks again. An
action repeat of k is the chunk [a[0:6] / k, a[6]] * k, executed whole.

`ActionRepeater` keeps that bookkeeping per env slot for a batched policy: each slot holds the plan (the actions
still to execute), `reset(slot)` (a new episode) drops the rest of it, and the model is asked only for the slots
whose plan has run out, so slots that reset at different times (the rollout engine's lockstep batches) each keep
their own phase.
"""
from __future__ import annotations

import collections
from typing import Callable, Sequence

import numpy as np

from ..errors import VlaBenchError


def execution_rule(action_repeat: int, control_hz: float = 20.0) -> dict:
    """What evaluation must do with one predicted action; written into the checkpoint's training config."""
    k = check_action_repeat(action_repeat)
    return {"action_repeat": k, "arm_scale": 1.0 / k, "gripper_scale": 1.0,
            "aggregation": "sum of arm deltas, last gripper" if k > 1 else "none",
            "data_hz": control_hz, "policy_hz": control_hz / k,
            "rule": f"execute [a[0:6] * {1.0 / k:g}, a[6]] for {k} consecutive env steps" if k > 1
            else "execute each predicted action once"}


def check_action_repeat(value, where: str = "action_repeat: ") -> int:
    """An action repeat must be an integer >= 1 (bools are not integers here); `where` prefixes the error (in the
    registry: 'checkpoints.toml: [checkpoints.NAME] action_repeat: ')."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise VlaBenchError(f"{where}must be an integer >= 1 (the env steps each predicted action is executed for), "
                            f"got {value!r}")
    return int(value)


def step_actions(actions, action_repeat: int, rule: dict | None = None) -> np.ndarray:
    """(..., 7) predicted actions -> the action executed at each of the next `action_repeat` env steps, by the rule
    (`rule`: execution_rule(action_repeat) made once by a caller on the control loop's path)."""
    rule = execution_rule(action_repeat) if rule is None else rule
    a = np.asarray(actions, dtype=np.float64)
    return np.concatenate([a[..., :-1] * rule["arm_scale"], a[..., -1:] * rule["gripper_scale"]], axis=-1)


def replay(actions, action_repeat: int) -> np.ndarray:
    """(N, 7) predicted actions -> (N * action_repeat, 7) env actions: each executed by the rule for k steps."""
    return np.repeat(step_actions(np.atleast_2d(actions), action_repeat), int(action_repeat), axis=0)


def check_replan_steps(value, where: str = "replan_steps: ") -> int | None:
    """None (execute every action of a chunk) or an integer >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise VlaBenchError(f"{where}must be an integer >= 1 (the actions of each chunk executed before the policy "
                            f"is asked again), got {value!r}")
    return int(value)


class ActionRepeater:
    """Per-slot execution plans for a batched policy: `act(slots, query)` returns one env action per slot, calling
    `query(rows)` (rows: positions in `slots`) only for the slots whose plan has run out.

    `query` answers (len(rows), 7) predictions, each executed for `action_repeat` steps by the rule, or
    (len(rows), H, 7) action chunks, of which the first `replan_steps` (all H when None) are executed as given."""

    def __init__(self, action_repeat: int = 1, replan_steps: int | None = None):
        self.action_repeat = check_action_repeat(action_repeat)
        self.replan_steps = check_replan_steps(replan_steps)
        self._rule = execution_rule(self.action_repeat)  # once, not at every control step
        self._plan: dict[int, collections.deque] = {}  # slot -> the env actions still to execute, in order
        self.queries = 0  # model calls made (tests and logs read it)

    def reset(self, slot: int) -> None:
        """A new episode in `slot`: the rest of its plan is dropped and its next call asks the model afresh."""
        self._plan.pop(slot, None)

    def due(self, slots: Sequence[int]) -> list[int]:
        """Positions in `slots` whose slot needs a new prediction at this step."""
        return [row for row, s in enumerate(slots) if not self._plan.get(s)]

    def plans(self, predicted, n: int) -> list[np.ndarray]:
        """The model's answer for n rows -> n (steps, 7) plans of env actions, by the rule of its shape: a (n, 7)
        array holds predictions (each executed action_repeat times by the rule); a (n, H, 7) array, or a list of n
        (H, 7) chunks or (7,) single actions (remote servers answer either), holds actions executed as given."""
        if isinstance(predicted, np.ndarray) and predicted.ndim == 2:
            if predicted.shape != (n, 7):
                raise ValueError(f"query returned shape {predicted.shape}, expected ({n}, 7) or ({n}, H, 7)")
            step = step_actions(predicted, self.action_repeat, self._rule)
            return list(np.repeat(step[:, None, :], self.action_repeat, axis=1))
        rows = list(predicted)
        if len(rows) != n:
            raise ValueError(f"query returned {len(rows)} answers for {n} rows")
        if self.action_repeat != 1:  # a chunk already says what each step executes
            raise ValueError("action chunks and action_repeat > 1 cannot be combined")
        plans = []
        for chunk in rows:
            chunk = np.asarray(chunk, dtype=np.float64)
            if chunk.shape == (7,):
                chunk = chunk[None]
            if chunk.ndim != 2 or chunk.shape[0] < 1 or chunk.shape[1] != 7:
                raise ValueError(f"query returned a chunk of shape {chunk.shape}, expected (H, 7) or (7,)")
            plans.append(chunk[:self.replan_steps])
        return plans

    def act(self, slots: Sequence[int], query: Callable[[list[int]], np.ndarray]) -> np.ndarray:
        slots = list(slots)
        if len(set(slots)) != len(slots):
            raise ValueError(f"slots must be distinct, got {slots}")
        rows = self.due(slots)
        if rows:
            plans = self.plans(query(rows), len(rows))
            self.queries += 1
            for row, plan in zip(rows, plans):
                self._plan[slots[row]] = collections.deque(plan)
        out = np.empty((len(slots), 7), dtype=np.float64)
        for row, s in enumerate(slots):
            out[row] = self._plan[s].popleft()
        return out
