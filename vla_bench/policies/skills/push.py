"""Push a flat object along the table: On(X, a table region) where X is too wide for the fingers and too low for a
rim pinch (a plate: its rim stands ~1.5 cm, where a bowl's stands 5 cm). The closed fingers go down inside X, near
its rim on the region's side, and push that rim from within, in a straight line, until X's centre is inside the
region. From within, not from behind: behind a plate there may be no room for the hand (LIBERO-Goal's plate starts
5 cm in front of the cabinet's handles).
"""
from __future__ import annotations

import numpy as np

from ..expert_geometry import BODY_GRASP_WIDTH, choose_yaw, hand_yaw, quat_xyzw_to_mat, yaw_for_axis
from ..expert_phases import CLOSE, move_action
from ..scripted import _View

FLAT_HEIGHT = 0.03  # objects at most this tall (m), and wider than the fingers, are pushed, not picked
ON_TABLE = 0.02  # a region site within this height of the object's bottom lies on the same surface (m)
WITHIN = 0.03  # the fingertips go down this far inside the object's edge (m)
PUSH_HEIGHT = 0.012  # the grip site's height above the object's bottom while pushing (m): the closed fingertips,
                     # 1.3 cm below it, press on the plate's floor and drag it by friction as well as by its rim
                     # (higher, they ride up the rim's low inner slope and over it: measured 0/3 against 2/3)
PUSH_STEP = 0.03  # the push target runs at most this far ahead (m)
INSIDE = 0.012  # done when the object's centre is this close to the region's centre (m)


def push_skill(pred, view: _View, episode):
    """A _Push for On(X, REGION) when X is flat and wide and REGION lies on the surface X stands on, else None."""
    if len(pred) != 3 or pred[0] != "on" or pred[1] not in view.names or pred[2] not in view.s["sites"]:
        return None
    i = view.index(pred[1])
    if view.s["is_fixture"][i]:
        return None
    lo, hi = view.world_extent(i)
    size = hi - lo
    site_z = float(view.s["sites"][pred[2]]["pos"][2])
    if size[2] > FLAT_HEIGHT or min(size[0], size[1]) <= BODY_GRASP_WIDTH or abs(site_z - lo[2]) > ON_TABLE:
        return None
    return _Push(pred[1], pred[2], episode)


class _Push:
    MAX_ATTEMPTS = 3

    def __init__(self, obj: str, region: str, episode):
        self.obj, self.region, self.ep = obj, region, episode
        self.phase, self.t, self.attempts = "plan", 0, 0

    def _go(self, phase):
        self.phase, self.t = phase, 0

    def step(self, obs, v: _View):
        self.t += 1
        i = v.index(self.obj)
        lo, hi = v.world_extent(i)
        centre = (lo + hi) / 2
        radius = float(max(hi[0] - lo[0], hi[1] - lo[1]) / 2)
        dest = np.asarray(v.s["sites"][self.region]["pos"], dtype=float)
        to_dest = dest[:2] - centre[:2]
        distance = float(np.linalg.norm(to_dest))
        eef = np.asarray(obs["robot0_eef_pos"], dtype=float)
        if self.phase == "plan":
            if distance < INSIDE:
                return None
            self.attempts += 1
            if self.attempts > self.MAX_ATTEMPTS:
                return None
            self.u = to_dest / distance
            # fingers across the push direction: both closed fingers meet the rim; of the two equivalent yaws,
            # the one that keeps joint 7 inside its limits
            R = quat_xyzw_to_mat(obs["robot0_eef_quat"])
            self.yaw = choose_yaw(yaw_for_axis([-self.u[1], self.u[0]]), hand_yaw(R),
                                  float(obs["robot0_joint_pos"][6]), np.asarray(v.s["robot_base"])[:2], eef[:2],
                                  centre[:2])
            self._go("approach")
        u = self.u
        start = np.array([*(centre[:2] + u * (radius - WITHIN)), lo[2] + PUSH_HEIGHT])
        if self.phase == "approach":
            target = start + np.array([0.0, 0.0, 0.10])
            if np.linalg.norm(target[:2] - eef[:2]) > 0.04:
                target[2] = max(target[2], eef[2])
            if np.linalg.norm(target - eef) < 0.01 or self.t > 60:
                self._go("descend")
            return move_action(obs, target, self.yaw, CLOSE)
        if self.phase == "descend":
            if np.linalg.norm(start - eef) < 0.006 or self.t > 20:
                self._go("push")
            return move_action(obs, start, self.yaw, CLOSE)
        if self.phase == "push":
            # aim from the object's current centre towards the region: the push line corrects itself
            line = to_dest / max(distance, 1e-9)
            ahead = centre[:2] + line * (radius - WITHIN + min(distance + 0.005, PUSH_STEP))
            target = np.array([*ahead, lo[2] + PUSH_HEIGHT])
            if distance < INSIDE or self.t > 120:
                self.lift_to = eef + np.array([0.0, 0.0, 0.10])
                self._go("lift")
            return move_action(obs, target, self.yaw, CLOSE)
        if self.phase == "lift":
            if self.t >= 10:
                self._go("plan")
            return move_action(obs, self.lift_to, self.yaw, CLOSE)
        raise AssertionError(f"unknown phase {self.phase}")
