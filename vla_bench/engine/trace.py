"""What happened inside one closed-loop episode: action statistics always, the per-step trajectory on request.

The episode loop makes one `EpisodeTrace` per episode, calls `add(action, obs)` once per executed control step (the
executed (7,) action and the observation the policy acted on), and `finish(...)` when the episode ends. `finish`
gives an `EpisodeSummary` whose fields are the results store's columns of the same names:

- arm_magnitude: the mean L2 norm of the arm action a[0:6] (LIBERO's OSC_POSE deltas, each in [-1, 1]);
- near_zero: the fraction of steps whose six arm values all lie inside the open-loop suites' dead zone
  (metrics/episode_figures.py: ARM_DEAD_ZONE), so a collapse to "no motion" shows in closed loop as in open loop;
- gripper_switches: how often the sign of the gripper command a[6] changes (LIBERO: -1 open, +1 close);
- stop_reason: why the episode ended ("success", "error", or for a failure: the expert's last phase, else
  "left workspace", "stalled", "out of steps").

The statistics are defined once, over whole arrays, in metrics/episode_figures.py (the demonstrations' figures in
the summary come from there); the trace keeps running sums of the same quantities and agrees with
`action_figures` on the same actions (tests).

With keep_steps the trace also keeps every step's action, end-effector position, quaternion (xyzw) and gripper finger
positions; `to_blob` packs them with NumPy's compressed npz (a documented, versioned format every NumPy reads, so a
stored trajectory needs no reader of ours) for the store's trajectories table.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import math
import zipfile
from typing import Mapping

import numpy as np

from ..metrics.episode_figures import near_zero_steps

#: A failed episode "stalled" when its end effector stayed within STALL_DISTANCE of its final position over the last
#: STALL_STEPS steps. 20 steps are 1 s of LIBERO's 20 Hz control; a saturated arm action moves the hand ~1.1 cm per
#: step (reference/LIBERO.md), so even a policy at 5% of full speed travels > 1 cm in that second, while a hand that
#: holds still drifts by millimetres (the OSC controller settling).
STALL_STEPS = 20
STALL_DISTANCE = 0.01  # metres

#: The box the end effector works in, relative to where it starts (the first observation, after the wait steps), in
#: metres of the world frame. Relative because the scenes differ (measured with the simulator, init state 0): on the
#: kitchen tables (spatial, goal) the hand starts at about (-0.21, 0.00, 1.17) over a table top at z 0.90, in
#: LIBERO-10's living room at (-0.05, 0.00, 0.70) over objects at z 0.43, on LIBERO-Object's floor at (-0.15, 0.00,
#: 0.25) over z 0.00: always 0.25-0.27 m above the work surface. The scripted expert's libero_spatial demos stay
#: within x -0.12..+0.33, y -0.11..+0.27, z -0.24..+0.02 of the start; driving one axis at full speed for 3 s
#: reaches x -0.38..-0.40 (pulled back towards the robot's base) / +0.38..+0.39 (stopped by the surface), y +-0.72
#: (beyond the table's sides), z +0.55..+0.58 (reared up over every fixture). The box is the tasks' region with
#: 15 cm or more to spare, so only an arm that has clearly wandered off is outside.
WORKSPACE_LOW = np.array([-0.32, -0.50, -0.40])
WORKSPACE_HIGH = np.array([0.50, 0.50, 0.35])

#: the observation keys read per step, with their sizes (LIBERO / robosuite names; quaternions are xyzw)
_OBS_KEYS = {"eef_pos": ("robot0_eef_pos", 3), "eef_quat": ("robot0_eef_quat", 4),
             "gripper": ("robot0_gripper_qpos", 2)}
#: the arrays of a stored trajectory and their widths (all float32)
TRAJECTORY_ARRAYS = {"actions": 7, **{name: size for name, (_, size) in _OBS_KEYS.items()}}

SUCCESS, ERROR, LEFT_WORKSPACE, STALLED, OUT_OF_STEPS = "success", "error", "left workspace", "stalled", "out of steps"


@dataclasses.dataclass(frozen=True)
class EpisodeSummary:
    """What the episode loop records beside the outcome: the fields are EpisodeRecord's columns of the same name
    (`EpisodeRecord(..., **dataclasses.asdict(summary))`). The figures are None for an episode of no steps."""

    arm_magnitude: float | None
    near_zero: float | None
    gripper_switches: int
    stop_reason: str


class EpisodeTrace:
    """One episode's steps as they are executed. Without keep_steps it holds running sums and the last
    STALL_STEPS + 1 positions only; with it, every step's arrays as well (an episode is at most 520 steps)."""

    def __init__(self, keep_steps: bool = False):
        self.keep_steps = keep_steps
        self.steps = 0
        self._norm_sum = 0.0
        self._near_zero = 0
        self._last_sign = 0.0
        self._switches = 0
        self._start: np.ndarray | None = None  # the first known hand position: WORKSPACE_* are relative to it
        self._left_workspace_at: int | None = None  # the first step whose hand was outside the box
        self._recent = collections.deque(maxlen=STALL_STEPS + 1)  # the last positions, for the stall test
        self._kept: dict[str, list[np.ndarray]] = {name: [] for name in TRAJECTORY_ARRAYS}

    def add(self, action, obs: Mapping | None) -> None:
        """One executed control step: the (7,) action the simulator executed and the observation the policy acted
        on. Observation values that are missing or of the wrong size are recorded as NaN."""
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (7,):
            raise ValueError(f"EpisodeTrace.add: expected a (7,) action, got shape {np.shape(action)}")
        self.steps += 1
        self._norm_sum += float(np.linalg.norm(a[:6]))
        self._near_zero += bool(near_zero_steps(a[None])[0])
        sign = float(np.sign(a[6]))
        if sign != 0:
            self._switches += self._last_sign != 0 and sign != self._last_sign
            self._last_sign = sign
        values = {name: _obs_array(obs, key, size) for name, (key, size) in _OBS_KEYS.items()}
        pos = values["eef_pos"]
        if np.all(np.isfinite(pos)):
            if self._start is None:
                self._start = pos
            offset = pos - self._start
            if self._left_workspace_at is None and (np.any(offset < WORKSPACE_LOW) or np.any(offset > WORKSPACE_HIGH)):
                self._left_workspace_at = self.steps
        self._recent.append(pos)
        if self.keep_steps:
            self._kept["actions"].append(a.astype(np.float32))
            for name, value in values.items():
                self._kept[name].append(value.astype(np.float32))

    def stalled(self) -> bool:
        """The hand stayed within STALL_DISTANCE of its final position over the last STALL_STEPS steps (False when
        the episode is shorter or a position is unknown)."""
        if len(self._recent) <= STALL_STEPS:
            return False
        recent = np.stack(self._recent)
        if not np.all(np.isfinite(recent)):
            return False
        return bool(np.linalg.norm(recent - recent[-1], axis=1).max() < STALL_DISTANCE)

    def finish(self, success: bool, steps: int, max_steps: int, error: str | None,
               phase: str | None = None) -> EpisodeSummary:
        """The episode's summary. `phase`: the scripted expert's last phase (`last_phase`); a failure names it
        instead of the motion-based reasons, which describe a model."""
        if error is not None:
            reason = ERROR
        elif success:
            reason = SUCCESS
        elif phase is not None:
            reason = f"phase: {phase}"
        elif self._left_workspace_at is not None:
            # before "stalled": an arm that left the box often ends pinned against a joint limit out there, which
            # also reads as no motion, but leaving is what went wrong
            reason = LEFT_WORKSPACE
        elif self.stalled():
            reason = STALLED
        elif steps >= max_steps:
            reason = OUT_OF_STEPS
        else:  # a failure before the step limit without an error: the loop stopped it (not expected today)
            reason = f"ended at step {steps} of {max_steps}"
        if not self.steps:
            return EpisodeSummary(None, None, 0, reason)
        return EpisodeSummary(self._norm_sum / self.steps, self._near_zero / self.steps, self._switches, reason)

    def arrays(self) -> dict[str, np.ndarray]:
        """The kept per-step arrays (empty (0, n) arrays when keep_steps is False or no step was added)."""
        return {name: (np.stack(self._kept[name]) if self._kept[name] else np.zeros((0, width), np.float32))
                for name, width in TRAJECTORY_ARRAYS.items()}

    def to_blob(self) -> bytes | None:
        """The per-step arrays as compressed npz bytes for ResultsStore.add(record, trajectory=...); None without
        keep_steps, so the loop can always pass `trace.to_blob()`."""
        if not self.keep_steps:
            return None
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **self.arrays())
        return buffer.getvalue()

    @staticmethod
    def from_blob(blob: bytes) -> dict[str, np.ndarray]:
        """The arrays `to_blob` packed: actions (T, 7), eef_pos (T, 3), eef_quat (T, 4), gripper (T, 2), float32."""
        try:
            with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"not a stored trajectory (an npz of {', '.join(TRAJECTORY_ARRAYS)}): {e}") from e
        missing = [name for name in TRAJECTORY_ARRAYS if name not in arrays]
        if missing:
            raise ValueError(f"stored trajectory lacks {', '.join(missing)} (has {', '.join(arrays) or 'nothing'})")
        return arrays


def _obs_array(obs: Mapping | None, key: str, size: int) -> np.ndarray:
    value = None if obs is None else obs.get(key)
    if value is not None:
        value = np.asarray(value, dtype=np.float64).reshape(-1)
        if value.shape == (size,):
            return value
    return np.full(size, math.nan)


def last_phase(policy, slot: int) -> str | None:
    """The phase a phase-reporting policy (the scripted expert) was in when the slot's episode ended, or None for
    any other policy. Ask before the slot's next `reset`: that starts a new episode and its phase."""
    from ..policies.base import ReportsPhase

    return policy.phase(slot) if isinstance(policy, ReportsPhase) else None
