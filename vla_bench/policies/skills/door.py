"""Open or close a hinged door (a hinge about a vertical axis, LIBERO's microwave): the goal predicates Open(X) /
Close(X) of a fixture X.

A door is pushed, not carried round its arc: the closed fingertips of the downward hand press its leaf near the
free edge, just below the leaf's top (the palm, 2.4 cm above the grip site, then passes over the leaf and over the
cabinet beside it), and the push target runs ahead along the arc as the leaf turns. To close, they press its outer
face. To open a closed door there is no face to press, so the hand first grasps the handle bar (turned horizontal,
pointing into the leaf, fingers closing across the vertical bar, as for a drawer) and pulls it round part of the
way, until the gap behind the leaf takes the fingers; then it presses the leaf's inner face. Pulling it all the way
would turn the hand with the leaf by 75 degrees or more, until it points back at the robot.

Which way is "open" comes from the fixture's own ranges (LIBERO's `default_open_ranges` / `default_close_ranges`),
as for drawers, and so does the test of success.
"""
from __future__ import annotations

import numpy as np

from ..expert_geometry import R_DOWN, choose_yaw, hand_yaw, quat_xyzw_to_mat, rot_z, world_aabbs, yaw_for_axis
from ..expert_phases import CLOSE, OPEN, move_action
from ..scripted import _View
from .drawer import BAR_GRASP_PHASES, grasp_bar, hand_frame, is_reached, open_sign, pose_action, rotation_error

PUSH_RADIUS = 0.8  # the fingertips press the leaf at this share of its width from the hinge
PUSH_GAP = 0.016  # the grip site stays this far off the pressed face (m): a closed fingertip's half thickness
BELOW_TOP = 0.018  # the grip site this far below the leaf's top (m): the palm, 2.4 cm above it, clears the top
BACK_OFF = 0.03  # the fingertips come down this far from the face they will press (m)
MOVE_STEP = 0.05  # the push target runs at most this far ahead along the arc (m)
OVERSHOOT = 0.15  # rad past the predicate's edge: the last push seats the door
PULL_ANGLE = 0.5  # rad a closed door is pulled open by its handle before the fingertips go behind it (at 0.6 the
# hand, turned with the leaf, stalled at 0.57 and the fingers slipped on the bar)
AJAR = 0.6  # a door open by this share of PULL_ANGLE is pressed from behind (it springs back ~0.1 rad on release)
PREGRASP = 0.08  # the horizontal hand waits this far in front of the handle bar before going in (m)
CLEAR_ABOVE = 0.10  # it turns and travels this far above the door's top (m): the turned hand reaches 10 cm down
#: the phases of pulling a closed door by its handle; the others press the leaf
PULL_PHASES = BAR_GRASP_PHASES + ("pull", "release", "back", "turn_down")


def door_skill(pred, view: _View, episode):
    """A _Door for Open(X) / Close(X) when fixture X has open and close ranges and one hinge about a vertical
    axis, else None."""
    if len(pred) != 2 or pred[0] not in ("open", "close") or pred[1] not in view.names:
        return None
    ranges = view.s["articulation_ranges"].get(pred[1], {})
    if not ranges.get("default_open_ranges") or not ranges.get("default_close_ranges"):
        return None
    hinges = [name for name, art in view.s["articulations"].items()
              if art["owner"] == pred[1] and art["type"] == "hinge" and abs(float(art["axis"][2])) > 0.9]
    if len(hinges) != 1:
        return None
    return _Door(pred[1], hinges[0], pred[0], ranges, episode)


def horizontal_unit(v) -> np.ndarray:
    u = np.array([float(v[0]), float(v[1]), 0.0])
    return u / max(float(np.linalg.norm(u)), 1e-9)


class DoorGeometry:
    """The door as it stands this step: hinge anchor, the leaf's direction from the hinge and its width, top and
    half thickness, the handle bar, and which way a point of the leaf moves when the door turns towards `want`."""

    def __init__(self, v: _View, joint: str, want: str, ranges):
        art = v.s["articulations"][joint]
        self.q = float(art["qpos"])
        self.anchor = np.asarray(art["anchor"], dtype=float)
        self.axis = np.asarray(art["axis"], dtype=float)
        door = np.asarray(v.s["geom_body"]) == art["body"]
        centres, mats, halves = v.boxes(door)
        boxes = np.asarray(v.s["geom_type"])[door] == 6
        # the leaf: the door body's box with the largest face
        area = np.sort(halves, axis=1)[:, 1:].prod(axis=1) * boxes
        leaf = int(np.argmax(area))
        lo, hi = world_aabbs(centres[leaf:leaf + 1], mats[leaf:leaf + 1], halves[leaf:leaf + 1])
        self.top = float(hi[0, 2])
        self.half_thickness = float(np.min(halves[leaf]))
        self.direction = horizontal_unit(centres[leaf] - self.anchor)
        self.width = 2.0 * float(np.linalg.norm((centres[leaf] - self.anchor)[:2]))
        # the handle: the door body's part farthest from the hinge axis
        reach = np.linalg.norm((centres - self.anchor)[:, :2], axis=1)
        self.handle = np.asarray(centres[int(np.argmax(reach))], dtype=float)
        offset = self.handle - self.anchor
        self.outward = horizontal_unit(offset - np.dot(offset, self.direction) * self.direction)
        # turning towards `want` moves a leaf point along (s * axis) x (point - anchor)
        self.turn = (open_sign(ranges) if want == "open" else -open_sign(ranges)) * self.axis
        self.motion = horizontal_unit(np.cross(self.turn, self.direction))

    def remaining(self, want: str, ranges) -> float:
        """How far (rad) the joint still has to turn to pass the predicate's edge by OVERSHOOT."""
        s = open_sign(ranges) if want == "open" else -open_sign(ranges)
        edges = ranges["default_open_ranges"] if want == "open" else ranges["default_close_ranges"]
        goal = (min(edges) if s > 0 else max(edges)) if want == "open" else (max(edges) if s > 0 else min(edges))
        return max(s * (goal - self.q), 0.0) + OVERSHOOT

    def turned(self, point, angle: float) -> np.ndarray:
        """`point` carried round the hinge by `angle` (rad) towards `want`."""
        rz = rot_z(angle * float(np.sign(self.turn[2])))
        return self.anchor + rz @ (np.asarray(point, dtype=float) - self.anchor)


class _Door:
    MAX_ATTEMPTS = 3

    def __init__(self, fixture: str, joint: str, want: str, ranges, episode):
        self.fixture, self.joint, self.want, self.ranges, self.ep = fixture, joint, want, ranges, episode
        self.phase, self.t, self.attempts = "plan", 0, 0
        self.yaw: float | None = None
        self.finger_sign: float | None = None

    def _go(self, phase):
        self.phase, self.t = phase, 0

    def reached(self, v: _View) -> bool:
        return is_reached(v.s["articulations"][self.joint]["qpos"], self.want, self.ranges)

    def _opened(self, g: DoorGeometry) -> float:
        """How far (rad) the leaf stands open from the closed range."""
        closed = self.ranges["default_close_ranges"]
        return max(open_sign(self.ranges) * (g.q - (min(closed) if open_sign(self.ranges) > 0 else max(closed))), 0.0)

    def step(self, obs, v: _View):
        self.t += 1
        g = DoorGeometry(v, self.joint, self.want, self.ranges)
        eef = np.asarray(obs["robot0_eef_pos"], dtype=float)
        if self.phase == "plan":
            if self.reached(v):
                return None
            self.attempts += 1
            if self.attempts > self.MAX_ATTEMPTS:
                return None
            self.yaw, self.finger_sign = None, None
            # a door open too little for the fingertips to go behind its leaf is pulled by its handle first
            ajar = self._opened(g) > AJAR * PULL_ANGLE
            self._go("approach" if self.want == "close" or ajar else "reorient")
        if self.phase in PULL_PHASES:
            return self._pull(obs, g, eef)
        return self._push(obs, v, g, eef)

    # ---- pressing the leaf -------------------------------------------------------------------------------------
    def _push(self, obs, v: _View, g: DoorGeometry, eef):
        """Press the leaf's face that leads away from the motion, at PUSH_RADIUS of its width, and follow it."""
        point = g.anchor + g.direction * (PUSH_RADIUS * g.width)
        point[2] = g.top - BELOW_TOP
        contact = point - g.motion * (g.half_thickness + PUSH_GAP)
        if self.yaw is None:  # fingers along the leaf: both fingertips press it; of the two yaws, the one that keeps
            # joint 7 inside its limits (after the pull turned the hand with the leaf, the nearer one stalled it)
            self.yaw = choose_yaw(yaw_for_axis(g.direction), hand_yaw(quat_xyzw_to_mat(obs["robot0_eef_quat"])),
                                  float(obs["robot0_joint_pos"][6]), np.asarray(v.s["robot_base"])[:2], eef[:2],
                                  contact[:2])
        if self.phase == "approach":
            target = contact - g.motion * BACK_OFF + np.array([0.0, 0.0, 0.10])
            if np.linalg.norm(target[:2] - eef[:2]) > 0.04:
                target[2] = max(target[2], eef[2])  # go over, then down
            if np.linalg.norm(target - eef) < 0.015 or self.t > 80:
                self._go("down")
            return move_action(obs, target, self.yaw, CLOSE)
        if self.phase == "down":
            target = contact - g.motion * BACK_OFF
            if np.linalg.norm(target - eef) < 0.01 or self.t > 40:
                self._go("press")
            return move_action(obs, target, self.yaw, CLOSE)
        if self.phase == "press":
            lost = float(np.linalg.norm((eef - contact)[:2])) > 0.05
            if is_reached(g.q, self.want, self.ranges) or self.t > 120 or lost:
                self.retreat_to = eef + np.array([0.0, 0.0, 0.10])
                self._go("retreat")
            ahead = min(g.remaining(self.want, self.ranges) * PUSH_RADIUS * g.width, MOVE_STEP)
            return move_action(obs, contact + g.motion * ahead, self.yaw, CLOSE)
        if self.phase == "retreat":
            if self.t >= 10:
                self._go("plan")
            return move_action(obs, self.retreat_to, self.yaw, OPEN)
        raise AssertionError(f"unknown phase {self.phase}")

    # ---- pulling a closed door open by its handle --------------------------------------------------------------
    def _frame(self, obs, g: DoorGeometry):
        """The horizontal hand pointing into the leaf, fingers closing across the bar (along the leaf): of the two
        such frames, the one nearer the hand's own when the attempt began."""
        if self.finger_sign is None:
            self.finger_sign = min((1.0, -1.0),
                                   key=lambda k: rotation_error(obs, hand_frame(-g.outward, k * g.direction)))
        return hand_frame(-g.outward, self.finger_sign * g.direction)

    def _pull(self, obs, g: DoorGeometry, eef):
        R_target = self._frame(obs, g)
        bar = g.handle
        if self.phase in BAR_GRASP_PHASES:  # turn above the door, then come down in front of the bar and grip it
            return grasp_bar(self, obs, eef, bar, g.outward, R_target, PREGRASP, g.top + CLEAR_ABOVE, then="pull")
        if self.phase == "pull":
            lost = float(np.linalg.norm(eef - bar)) > 0.03
            if self._opened(g) >= PULL_ANGLE or self.t > 80 or lost:
                self._go("release")
            radius = float(np.linalg.norm((bar - g.anchor)[:2]))
            step = min(MOVE_STEP / max(radius, 1e-3), PULL_ANGLE)
            return pose_action(obs, g.turned(bar, step), R_target, CLOSE)
        if self.phase == "release":
            if self.t >= 6:
                self.retreat_to = eef + g.outward * PREGRASP
                self._go("back")
            return pose_action(obs, eef, R_target, OPEN)
        if self.phase == "back":
            if self.t >= 12:
                self._go("turn_down")
            return pose_action(obs, self.retreat_to, R_target, OPEN)
        if self.phase == "turn_down":  # point down again, above the door, before pressing its inner face
            up = np.array([*self.retreat_to[:2], g.top + CLEAR_ABOVE])
            yaw = yaw_for_axis(g.direction)
            if rotation_error(obs, rot_z(yaw) @ R_DOWN) < 0.2 or self.t > 40:
                self._go("plan")
            return move_action(obs, up, yaw, OPEN)
        raise AssertionError(f"unknown phase {self.phase}")

