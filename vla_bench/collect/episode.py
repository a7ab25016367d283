"""What `vla-bench collect` records of an expert episode from a random reset (the loop is engine/episode.py's).

Action noise (`--action-noise SIGMA`, off by default): the simulator executes the expert's action plus Gaussian
noise on the arm dimensions (a[0:6], clipped to [-1, 1]; the gripper is untouched), while `actions` records the
expert's own, clean action. The expert corrects the perturbation at the next step, so the demos show the way back
from the small off-path states that a cloned policy drifts into in closed loop, labelled with the expert's
correction (DART, Laskey et al. 2017). Without it every demo follows the expert's own path, and a policy that
imitates it well open loop can still fail closed loop from its first small error. The executed actions are stored
too (`executed_actions`; replaying `actions` does not reproduce `states` then), the noise is drawn from a generator
seeded by the demo's seed, and a file records its sigma: resuming with another sigma is refused. Measured with the
scripted expert on LIBERO-Spatial: sigma 0.3 cost 55 failed attempts for task6's 50 demos (none without noise) and
left task8 at 5 of 10 demos, so start lower.
"""
from __future__ import annotations

import numpy as np


CAMERAS = (("agentview", "agentview_image", "agentview_rgb"),
           ("robot0_eye_in_hand", "robot0_eye_in_hand_image", "eye_in_hand_rgb"))
DEFAULT_CAMERAS = tuple(name for name, _, _ in CAMERAS)

ARM_DIMS = 6  # a[0:6] moves the arm (translation + rotation deltas); a[6] is the gripper


def perturb(action: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """The action the simulator executes under action noise: Gaussian noise on the arm dimensions, clipped to the
    action range; the gripper command as the expert gave it."""
    executed = np.array(action, dtype=np.float64)
    executed[:ARM_DIMS] = np.clip(executed[:ARM_DIMS] + rng.normal(0.0, sigma, ARM_DIMS), -1.0, 1.0)
    return executed


class DemoRecorder:
    """What a collected episode records, step by step, as a `write_libero_demos` mapping: the simulator state, the
    robot's proprioception and the camera frames before each step, the expert's action and (under action noise) the
    executed one. The episode loop itself is engine/episode.py's, the same as evaluation's."""

    def __init__(self, init_state, request):
        self.init_state = init_state
        self.request = request
        self.rows: dict[str, list] = {k: [] for k in ("actions", "executed_actions", "states", "robot_states",
                                                      "ee_states", "gripper_states", "joint_states")}
        self.images: dict[str, list] | None = None

    def add(self, obs: dict, action: np.ndarray, executed: np.ndarray, sim_state: np.ndarray) -> None:
        from robosuite.utils.transform_utils import quat2axisangle

        if self.images is None:
            self.images = {name: [] for _, key, name in CAMERAS if key in obs}
        rows = self.rows
        rows["states"].append(sim_state)
        gripper = np.asarray(obs["robot0_gripper_qpos"], dtype=np.float64)
        pos = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        quat = np.array(obs["robot0_eef_quat"], dtype=np.float64)  # xyzw; quat2axisangle clips it in place
        rows["robot_states"].append(np.concatenate([gripper, pos, quat]))  # LIBERO's get_robot_state_vector
        rows["ee_states"].append(np.concatenate([pos, quat2axisangle(quat.copy())]))
        rows["gripper_states"].append(gripper)
        rows["joint_states"].append(np.asarray(obs["robot0_joint_pos"], dtype=np.float64))
        for _, key, name in CAMERAS:
            if name in self.images:
                self.images[name].append(np.asarray(obs[key], dtype=np.uint8))
        rows["actions"].append(np.asarray(action, dtype=np.float64))
        rows["executed_actions"].append(np.asarray(executed, dtype=np.float64))

    def result(self) -> dict:
        stack = {k: np.stack(v) if v else np.zeros((0,)) for k, v in self.rows.items()}
        images = self.images or {}
        episode = {
            "actions": stack["actions"], "states": stack["states"], "robot_states": stack["robot_states"],
            "obs": {"ee_states": stack["ee_states"], "gripper_states": stack["gripper_states"],
                    "joint_states": stack["joint_states"],
                    **{name: np.stack(frames) for name, frames in images.items() if frames}},
            "init_state": self.init_state,
            "attrs": {"seed": int(self.request.seed), "action_noise": float(self.request.action_noise)},
        }
        if self.request.action_noise > 0:
            episode["executed_actions"] = stack["executed_actions"]
        return episode
