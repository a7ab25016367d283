"""The execution rule of a temporally subsampled policy (action repeat): its one home, for training and evaluation.

A model fine-tuned with `vla-bench finetune --action-repeat k` learned one action per window of k env steps: the
window's arm deltas summed, its last gripper command (finetune/data.py: `aggregate_steps`). Evaluation replays that
by `execution_rule(k)`: query the model once every k env steps per environment, and execute
[a[0:6] * arm_scale, a[6] * gripper_scale] = [a[0:6] / k, a[6]] for the k steps, so the arm moves by the window's
sum in total and the gripper holds the window's last command.

`ActionRepeater` keeps that bookkeeping per env slot for a batched policy: a slot's counter restarts on
`reset(slot)` (a new episode), and the model is asked only for the slots whose held action has run out, so slots
that reset at different times (the rollout engine's lockstep batches) each keep their own phase.
"""
from __future__ import annotations

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


class ActionRepeater:
    """Per-slot action repeat for a batched policy: `act(slots, query)` returns one env action per slot, calling
    `query(rows)` (rows: positions in `slots`) only for the slots that need a new prediction."""

    def __init__(self, action_repeat: int = 1):
        self.action_repeat = check_action_repeat(action_repeat)
        self._rule = execution_rule(self.action_repeat)  # once, not at every control step
        self._held: dict[int, np.ndarray] = {}  # slot -> the per-step action being executed
        self._left: dict[int, int] = {}  # slot -> env steps it is still executed for
        self.queries = 0  # model calls made (tests and logs read it)

    def reset(self, slot: int) -> None:
        """A new episode in `slot`: its next call asks the model afresh."""
        self._held.pop(slot, None)
        self._left.pop(slot, None)

    def due(self, slots: Sequence[int]) -> list[int]:
        """Positions in `slots` whose slot needs a new prediction at this step."""
        return [row for row, s in enumerate(slots) if self._left.get(s, 0) <= 0]

    def act(self, slots: Sequence[int], query: Callable[[list[int]], np.ndarray]) -> np.ndarray:
        slots = list(slots)
        if len(set(slots)) != len(slots):
            raise ValueError(f"slots must be distinct, got {slots}")
        rows = self.due(slots)
        if rows:
            predicted = np.asarray(query(rows), dtype=np.float64)
            if predicted.shape != (len(rows), 7):
                raise ValueError(f"query returned shape {predicted.shape}, expected ({len(rows)}, 7)")
            self.queries += 1
            for row, action in zip(rows, step_actions(predicted, self.action_repeat, self._rule)):
                self._held[slots[row]] = action
                self._left[slots[row]] = self.action_repeat
        out = np.empty((len(slots), 7), dtype=np.float64)
        for row, s in enumerate(slots):
            out[row] = self._held[s]
            self._left[s] -= 1
        return out
