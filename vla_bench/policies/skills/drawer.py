"""Open or close a drawer (a slide joint of a fixture's region): the goal predicates Open(REGION) / Close(REGION).

To open, the hand turns horizontal, pointing into the drawer's front, the fingers stand vertical and close around the
handle bar from the front (a top-down grasp cannot: the bar sits 1.6 cm in front of the drawer face, below its top
edge), then the hand pulls along the slide until the joint is past the open threshold. To close, the closed
fingertips of the downward hand, leaning towards the cabinet, push the handle back in (a hand turned horizontal could
not get in front of a drawer that opens towards the robot; vertical fingers would put the 20 cm wide hand into the
table in front of a bottom drawer).

Which way is "open" comes from the fixture's own ranges (LIBERO's `default_open_ranges` / `default_close_ranges`):
the open range lies on one side of the closed one, and the predicates test the joint against the near end of each.
"""
from __future__ import annotations

import numpy as np

from ..expert_geometry import (R_DOWN, axis_angle, escape_shift, hand_clearance, quat_xyzw_to_mat, rot_z,
                               world_aabbs, yaw_for_axis)
from ..expert_phases import CLOSE, OPEN, POS_GAIN, ROT_GAIN, _PickPlace
from ..scripted import _View

HAND_REACH = 0.105  # how far the hand reaches along its finger axis from the grip site (m)
PREGRASP = 0.10  # the hand waits this far in front of the handle before going in (m)
RETREAT = 0.08
HOME = (-0.2, 0.0, 1.17)  # the grip site at LIBERO's reset pose (m)
OVERSHOOT = 0.03
PUSH_OFFSET = 0.022  # to close, the downward hand's grip site stops this far in front of the handle's centre (m)
PUSH_ABOVE = 0.015  # and this far above it: the forearm, above the hand, then clears the cabinet's top edge
MOVE_STEP = 0.05  # the pull / push target runs at most this far ahead of the handle (m)
CLOSE_TILT = 0.6  # rad: to close, the downward hand leans this far towards the cabinet (0.6 and 0.9 measured alike)


def drawer_skill(pred, view: _View, episode):
    """A _Drawer for Open(REGION) / Close(REGION) when REGION moves on one slide joint, else None."""
    if len(pred) != 2 or pred[0] not in ("open", "close"):
        return None
    joints = view.s["site_joints"].get(pred[1], [])
    arts = view.s["articulations"]
    if len(joints) != 1 or arts[joints[0]]["type"] != "slide":
        return None
    owner = arts[joints[0]]["owner"]
    ranges = view.s["articulation_ranges"].get(owner, {})
    if not ranges.get("default_open_ranges") or not ranges.get("default_close_ranges"):
        return None
    return _Drawer(pred[1], joints[0], pred[0], ranges, episode)


UNDER_REACH = 0.02  # an object this near (xy, m) to the space an opened drawer takes is moved aside before opening
# (the hand then grips it on a side that keeps the hand clear of the drawer: choose_grasp weighs clearance)


def out_from_under(obj: str, skill: "_Drawer", view: _View, episode) -> list:
    """A pick-and-place that moves `obj` out of the space the drawer will take once open (from above: the drawer's
    bottom is higher than the object's top), to the nearest free spot on the table; [] when it is clear already."""
    if obj not in view.names:
        return []
    art = view.s["articulations"][skill.joint]
    d_open = drawer_opening(skill.region, view)
    edge = skill.ranges["default_open_ranges"]
    travel = abs((max(edge) if open_sign(skill.ranges) > 0 else min(edge)) - art["qpos"]) + OVERSHOOT
    drawer = np.asarray(view.s["geom_body"]) == art["body"]
    lo, hi = world_aabbs(*view.boxes(drawer))
    shift = np.zeros(3)
    shift[:2] = d_open[:2] * travel
    opened_lo, opened_hi = lo.min(0) + np.minimum(shift, 0), hi.max(0) + np.maximum(shift, 0)
    i = view.index(obj)
    olo, ohi = view.world_extent(i)
    if opened_lo[2] < ohi[2]:  # the drawer passes beside the object, not over it
        return []
    grown = (olo[:2] - UNDER_REACH, ohi[:2] + UNDER_REACH)
    others = ~view.own(i) & ~drawer
    blo, bhi = world_aabbs(*view.boxes(others))
    beside = (blo[:, 2] < ohi[2]) & (bhi[:, 2] > olo[2] + 0.005)
    low = True  # a way along which nothing stands: carried just above the table
    move = escape_shift([grown], opened_lo, opened_hi, blo[beside], bhi[beside], [(olo[:2], ohi[:2])])
    if move is None:  # only a spot to reach over something (a wine bottle): carried over everything near the way
        low = False
        move = escape_shift([grown], opened_lo, opened_hi, blo[beside], bhi[beside], [(olo[:2], ohi[:2])],
                            path=False)
    if move is None or not np.any(move):
        return []
    return [_MoveAside(obj, np.asarray(view.s["pos"][i][:2], dtype=float) + move, "on", episode, low=low)]


class _MoveAside(_PickPlace):
    """Pick-and-place to a point on the table, before the drawer it makes way for is opened (skills.ORDER). It is
    carried just above where it stood: out_from_under chose a way along which nothing stands (the general carry
    height clears everything near the path, a wine bottle 16 cm high: 30 steps of a 300-step task)."""
    want = "clear"
    CARRY_ABOVE = 0.045  # m over its resting bottom (the lift ends 3 cm up)
    RETREAT_STEPS = 4  # the drawer skill that follows starts by going up: 6 steps a 300-step task needs

    def __init__(self, obj, dest, relation, episode, low: bool = True):
        super().__init__(obj, dest, relation, episode)
        self.low = low
        self._low = None

    def _carry_bottom(self, v: _View, start_xy, end_xy) -> float:
        if not self.low:
            return super()._carry_bottom(v, start_xy, end_xy)
        if self._low is None:  # first asked at the start of the lift, with the object still at rest
            self._low = float(v.world_extent(v.index(self.obj))[0][2]) + self.CARRY_ABOVE
        return self._low


def drawer_opening(region: str, view: _View):
    """The horizontal unit direction in which the drawer of `region` opens, or None when it is not a drawer's."""
    joints = view.s["site_joints"].get(region, [])
    arts = view.s["articulations"]
    if len(joints) != 1 or arts[joints[0]]["type"] != "slide":
        return None
    ranges = view.s["articulation_ranges"].get(arts[joints[0]]["owner"], {})
    if not ranges.get("default_open_ranges") or not ranges.get("default_close_ranges"):
        return None
    d = open_sign(ranges) * np.asarray(arts[joints[0]]["axis"], dtype=float)
    d[2] = 0.0
    return d / np.linalg.norm(d)


def open_sign(ranges) -> float:
    """+1 when opening increases the joint position, -1 when it decreases it."""
    return 1.0 if np.mean(ranges["default_open_ranges"]) > np.mean(ranges["default_close_ranges"]) else -1.0


def is_reached(q: float, want: str, ranges) -> bool:
    """LIBERO's own test: open past the near end of the open range, closed past the near end of the closed one."""
    s = open_sign(ranges)
    if want == "open":
        edge = min(ranges["default_open_ranges"]) if s > 0 else max(ranges["default_open_ranges"])
        return s * (q - edge) > 0
    edge = max(ranges["default_close_ranges"]) if s > 0 else min(ranges["default_close_ranges"])
    return s * (edge - q) > 0


#: the phases of grasp_bar, in order
BAR_GRASP_PHASES = ("reorient", "lower", "insert", "grip")


def grasp_bar(skill, obs, eef, bar, outward, R_target, pregrasp: float, clear_z: float, then: str):
    """The action of one step of grasping a bar (a drawer's or a door's handle) from in front with the hand in the
    pose R_target: turn while travelling at clear_z or higher, come down `pregrasp` in front of the bar (`outward`
    from it), go in until the grip site is a little past the bar's centre, close for 10 steps; then skill goes to
    phase `then`. `skill` has .phase, .t and ._go (phases BAR_GRASP_PHASES)."""
    waiting = bar + outward * pregrasp
    if skill.phase == "reorient":
        target = waiting.copy()
        target[2] = max(target[2], clear_z)
        return reach(skill, obs, eef, target, R_target, OPEN, 0.015, 80, "lower", turned=True)
    if skill.phase == "lower":
        return reach(skill, obs, eef, waiting, R_target, OPEN, 0.01, 40, "insert")
    if skill.phase == "insert":  # the grip site onto the bar, a little past its centre
        target = bar - outward * 0.004
        if np.linalg.norm(target - eef) < 0.004 or skill.t > 30:
            skill._go("grip")
        return pose_action(obs, target, R_target, OPEN)
    if skill.phase == "grip":
        if skill.t >= 10:
            skill._go(then)
        return pose_action(obs, bar, R_target, CLOSE)
    raise AssertionError(f"grasp_bar has no phase {skill.phase}")


def hand_frame(point_into, finger_axis) -> np.ndarray:
    """The hand's rotation with its approach axis (local z) along `point_into` and its fingers along `finger_axis`."""
    z = np.asarray(point_into, dtype=float)
    z = z / np.linalg.norm(z)
    y = np.asarray(finger_axis, dtype=float)
    y = y - z * np.dot(y, z)
    y = y / np.linalg.norm(y)
    return np.stack([np.cross(y, z), y, z], axis=1)


def pose_action(obs, target, R_target, gripper) -> np.ndarray:
    """P control of the grip site to `target` and of the hand to the rotation R_target."""
    a = np.zeros(7)
    eef = np.asarray(obs["robot0_eef_pos"], dtype=float)
    a[:3] = np.clip(POS_GAIN * (np.asarray(target) - eef), -1.0, 1.0)
    R = quat_xyzw_to_mat(obs["robot0_eef_quat"])
    a[3:6] = np.clip(ROT_GAIN * axis_angle(R_target @ R.T), -1.0, 1.0)
    a[6] = gripper
    return a


def rotation_error(obs, R_target) -> float:
    R = quat_xyzw_to_mat(obs["robot0_eef_quat"])
    return float(np.linalg.norm(axis_angle(R_target @ R.T)))


def reach(skill, obs, eef, target, R_target, gripper, within: float, steps: int, then: str,
          turned: bool = False) -> np.ndarray:
    """One step of a phase that takes the grip site to `target` in the pose R_target: `skill` goes to phase `then`
    once the grip site is within `within` of it (and the hand turned to R_target, where `turned`) or after `steps`
    steps. `skill` has .t and ._go."""
    close = np.linalg.norm(target - eef) < within and (not turned or rotation_error(obs, R_target) < 0.1)
    if close or skill.t > steps:
        skill._go(then)
    return pose_action(obs, target, R_target, gripper)


class _Drawer:
    MAX_ATTEMPTS = 3

    def __init__(self, region: str, joint: str, want: str, ranges, episode):
        self.region, self.joint, self.want, self.ranges, self.ep = region, joint, want, ranges, episode
        self.phase, self.t, self.attempts = "plan", 0, 0
        self.finger_sign: float | None = None

    def _go(self, phase):
        self.phase, self.t = phase, 0

    def reached(self, v: _View) -> bool:
        return is_reached(v.s["articulations"][self.joint]["qpos"], self.want, self.ranges)

    def _handle(self, v: _View, d_open):
        """The drawer's handle bar: the geom of the drawer body that reaches farthest along the opening direction."""
        art = v.s["articulations"][self.joint]
        mask = np.asarray(v.s["geom_body"]) == art["body"]
        centres = v.s["geom_pos"][mask]
        return centres[int(np.argmax(centres @ d_open))].copy()

    def _clear_height(self, v: _View) -> float:
        """A grip-site height at which the turned hand passes over every movable object."""
        movable = ~np.asarray(v.s["is_fixture"], dtype=bool)
        mask = movable[np.asarray(v.s["geom_owner"])]
        if not mask.any():
            return 0.0
        lo, hi = world_aabbs(*v.boxes(mask))
        return float(hi[:, 2].max()) + HAND_REACH + 0.02

    def _push_point(self, v: _View, handle, d_open) -> np.ndarray:
        """Where the closed fingertips of the downward hand push the handle: just in front of it, shifted along the
        bar to whichever of three points leaves the hand farthest from the movable objects (a bottle beside the
        drawer)."""
        bar = np.cross([0.0, 0.0, 1.0], d_open)
        movable = ~np.asarray(v.s["is_fixture"], dtype=bool)
        obstacles = v.boxes(movable[np.asarray(v.s["geom_owner"])])
        up = np.array([0.0, 0.0, PUSH_ABOVE])
        options = [handle + d_open * PUSH_OFFSET + bar * k + up for k in (0.0, -0.025, 0.025)]
        return max(options, key=lambda point: min(hand_clearance(point, bar, *obstacles), 0.03))

    def step(self, obs, v: _View):
        self.t += 1
        art = v.s["articulations"][self.joint]
        q = art["qpos"]
        sign = open_sign(self.ranges)
        # the slide moves the drawer by q * axis; opening moves q by `sign`
        d_open = sign * np.asarray(art["axis"], dtype=float)
        d_open[2] = 0.0
        d_open /= np.linalg.norm(d_open)
        eef = np.asarray(obs["robot0_eef_pos"], dtype=float)
        handle = self._handle(v, d_open)
        if self.phase == "plan":
            if is_reached(q, self.want, self.ranges):
                return None
            self.attempts += 1
            if self.attempts > self.MAX_ATTEMPTS:
                return None
            if self.want == "close":
                self.finger_sign = None  # chosen again for each attempt's frame
                self.push_at = self._push_point(v, handle, d_open) - handle
            self._go("reorient")
        if self.want == "open":
            return self._open(obs, v, q, sign, d_open, eef, handle)
        return self._close(obs, q, d_open, eef, handle)

    def _close(self, obs, q, d_open, eef, handle):
        """Push the handle back with the closed fingertips of the hand pointing down and tilted CLOSE_TILT towards the
        cabinet: the fingertips lead and the forearm stays back (pointing straight down, the forearm of the arm
        reaching a bottom drawer met the cabinet's base 5 cm before the drawer closed: LIBERO-10 task4, 0/50)."""
        point = handle + self.push_at
        closing = -d_open
        approach = np.array([0.0, 0.0, -1.0]) * np.cos(CLOSE_TILT) + closing * np.sin(CLOSE_TILT)
        bar = np.cross([0.0, 0.0, 1.0], d_open)
        R_target = self._frame(obs, approach, bar)
        if self.phase == "reorient":
            target = point + np.array([0.0, 0.0, 0.10])
            if np.linalg.norm(target[:2] - eef[:2]) > 0.04:
                target[2] = max(target[2], eef[2])  # go over, then down
            return reach(self, obs, eef, target, R_target, CLOSE, 0.015, 80, "lower", turned=True)
        if self.phase == "lower":
            return reach(self, obs, eef, point, R_target, CLOSE, 0.008, 40, "move")
        if self.phase == "move":
            lost = float(np.linalg.norm((eef - point)[:2])) > 0.03
            if is_reached(q, "close", self.ranges) or self.t > 80 or lost:
                self.retreat_to = eef + np.array([0.0, 0.0, 0.10])
                self._go("retreat")
            edge = self.ranges["default_close_ranges"]
            goal = min(edge) if open_sign(self.ranges) > 0 else max(edge)
            remaining = abs(goal - q) + OVERSHOOT
            return pose_action(obs, point - d_open * min(remaining, MOVE_STEP), R_target, CLOSE)
        if self.phase == "retreat":
            if self.t >= 10:
                self._go("restore")
            return pose_action(obs, self.retreat_to, R_target, CLOSE)
        if self.phase == "restore":
            return self._restore(obs, eef, d_open)
        raise AssertionError(f"unknown phase {self.phase}")

    def _frame(self, obs, approach, fingers):
        """The hand's rotation pointing along `approach` with its fingers along `fingers`: of the two such frames
        (the fingers are symmetric under a half turn about the approach axis), the one nearer the hand's own when
        the attempt began."""
        if self.finger_sign is None:
            self.finger_sign = min((1.0, -1.0), key=lambda k: rotation_error(obs, hand_frame(approach, k * fingers)))
        return hand_frame(approach, self.finger_sign * fingers)

    def _restore(self, obs, eef, d_open):
        """Point the hand down again before the next skill: its controllers assume a downward hand, and turning
        while they move would lift the hand (their "go over, then down" keeps the highest point reached). Of the two
        downward frames (fingers along the slide), the one nearer the reset yaw: the other can leave joint 7 near
        its limit for the next skill. And head back towards the reset pose: from beside the cabinet the arm reached
        the next grasp in a posture that stalled it short of the target (LIBERO-Goal task4, 4 of 5 inits); once
        the hand points down the next skill goes on from where this one got (waiting to arrive cost task4 ~6 of its
        300 steps)."""
        yaw = min((yaw_for_axis(k * d_open) for k in (1.0, -1.0)), key=abs)
        R_down = rot_z(yaw) @ R_DOWN
        home = np.array([HOME[0], HOME[1], max(HOME[2], self.retreat_to[2])])
        if rotation_error(obs, R_down) < 0.2 or self.t > 40:
            self._go("plan")  # done, or another attempt if the joint is not there yet
        return pose_action(obs, home, R_down, OPEN)

    def _open(self, obs, v, q, sign, d_open, eef, handle):
        """Grasp the handle bar from the front with the hand turned horizontal, fingers vertical, and pull."""
        R_target = self._frame(obs, -d_open, np.array([0.0, 0.0, 1.0]))  # horizontal, into the drawer front
        if self.phase in BAR_GRASP_PHASES:
            # turn and travel above everything (the turned hand reaches HAND_REACH below the grip site), then come
            # down in front of the handle
            return grasp_bar(self, obs, eef, handle, d_open, R_target, PREGRASP, self._clear_height(v), then="move")
        if self.phase == "move":
            # the hand follows the handle (not its own position): a grip that slips shows as a growing gap
            lost = float(np.linalg.norm(eef - handle)) > 0.03
            if is_reached(q, "open", self.ranges) or self.t > 80 or lost:
                self._go("release")
            edge = self.ranges["default_open_ranges"]
            remaining = abs((max(edge) if sign > 0 else min(edge)) - q) + OVERSHOOT
            return pose_action(obs, handle + d_open * min(remaining, MOVE_STEP), R_target, CLOSE)
        if self.phase == "release":
            if self.t >= 6:
                self.retreat_to = eef + d_open * RETREAT
                self._go("retreat")
            return pose_action(obs, eef, R_target, OPEN)
        if self.phase == "retreat":
            if self.t >= 12:
                self._go("restore")
            return pose_action(obs, self.retreat_to, R_target, OPEN)
        if self.phase == "restore":
            return self._restore(obs, eef, d_open)
        raise AssertionError(f"unknown phase {self.phase}")
