"""The scripted expert's phase machines, one per skill it has built in: _PickPlace (plan a grasp, approach, descend,
close, lift, carry, lower, release) and _TurnOn (grasp a knob's bar and turn it), with the heights they aim at
under each motion and the proportional control (`move_action`) that turns a target pose into an action.

What the phases and motions are for is in scripted.py's docstring; the skills in skills/ follow the same step()
protocol.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from .expert_geometry import (BODY_GRASP_WIDTH, R_DOWN, axis_angle, choose_grasp, choose_yaw, escape_shift,
                              gripper_clearance, hand_clearance, hand_footprint, hand_yaw, overlap_xy, quat_xyzw_to_mat,
                              rot_z, world_aabbs, wrap, yaw_for_axis)

if TYPE_CHECKING:  # annotations only: scripted.py imports this module
    from .scripted import _Episode, _View

# ---- control constants (measured on LIBERO's OSC_POSE controller; see scripted.py's docstring) -------------------
POS_GAIN = 20.0  # action 1.0 asks for 5 cm, so 20 * error asks for the whole error in one step
ROT_GAIN = 2.0  # action 1.0 asks for 0.5 rad
OPEN, CLOSE = -1.0, 1.0
HOVER = 0.10  # approach height above the grasp point
FUNNEL_GRASP_XY = 0.04  # motion "funnel": horizontal error (m) from which the hand is at HOVER over the grasp point
FUNNEL_PLACE_XY = 0.03  # motion "funnel": horizontal error (m) from which the object is at the carry height
CLOSE_WITHIN = {False: 0.006, True: 0.015}  # the gripper closes this near the grasp point (m); True: "decisive"
RELEASE_ABOVE = {False: 0.012, True: 0.03}  # it opens with the object's bottom this far above its rest (m)
FINGERS_STOPPED = 0.0005  # "decisive" lifts once the finger gap changes less than this per step (m)
PLACE_CLEARANCE = 0.008  # the lowering aims the object's bottom this far above what it will rest on
SHARED_SPREAD = 0.6  # objects sharing a region go this share of its half size from its centre, on its diagonal
CLOSED_TOP_RADIUS = 0.02  # a wide object whose top band lies this near its centre has no rim to pinch (m)
HANDLE_WIDTH = 0.02  # a handle is at most this wide across (m) and at least this long
HANDLE_OFF_CENTRE = 0.03  # and its centre this far from the object's (m)
HANDLE_MIN_HEIGHT = 0.03  # and this tall: a grip, not a lid's knob (m)
HANDLE_MAX_SHARE = 0.6  # and at most this share of the object's height: the walls of its body run the whole height
PALM_ABOVE = 0.026  # the grip site this far below the top of what is under the hand: the palm 2.4 cm above it clears
SLIDE_RISE = 0.012  # a held object slides out from under an overhang this far above where it stood (m)
SHIFT_ALONG = 0.03  # a blocked grasp across the body may move this far along the object (m)
SHIFT_END = 0.012  # keeping the fingers this far inside the object's end
SHIFT_ACROSS = 0.01  # or this far along the fingers
SHIFT_IF_WITHIN = 0.01  # when its modelled gripper is this near a neighbour (m): the model is a few mm smaller than
# the simulated hand (the butter's centred grasp, 2-4 mm off the basket in the model, stalled 5 cm above the butter)
BLOCKED_WITHIN = 0.003  # a hand this near a fixture where the object is put down counts as running into it (m)
ESCAPE_ABOVE = 0.25  # what starts within this height over a gripped object's top is in the way of its lift (m)


def _knob_joint(scene, name):
    """The hinge joint of fixture `name` that has a turn-on range, or None."""
    if "turnon" not in " ".join(scene.get("articulation_ranges", {}).get(name, {})):
        return None
    for jname, art in scene.get("articulations", {}).items():
        if art["owner"] == name and art["type"] == "hinge":
            return jname
    return None


def approach_height(xy_err: float, funnel: bool) -> float:
    """How far above the grasp point the hand aims during the approach, at horizontal error xy_err (m): HOVER, or
    under motion "funnel" a height that shrinks with the error, reaching the grasp point itself at 0."""
    return HOVER * min(1.0, xy_err / FUNNEL_GRASP_XY) if funnel else HOVER


def carry_height(carry_bottom: float, floor: float, xy_err: float, funnel: bool) -> float:
    """The height the carried object's bottom aims at, at horizontal error xy_err (m) from its destination:
    carry_bottom, or under motion "funnel" a height that descends with the error to just above the floor."""
    if not funnel:
        return carry_bottom
    rest = floor + PLACE_CLEARANCE
    return rest + (carry_bottom - rest) * min(1.0, xy_err / FUNNEL_PLACE_XY)


def move_action(obs, target, yaw, gripper) -> np.ndarray:
    """P control of the grip site towards `target` and of the hand towards the downward pose at `yaw`
    (None: keep pointing down at the current yaw)."""
    a = np.zeros(7)
    eef = np.asarray(obs["robot0_eef_pos"], dtype=float)
    a[:3] = np.clip(POS_GAIN * (np.asarray(target) - eef), -1.0, 1.0)
    R = quat_xyzw_to_mat(obs["robot0_eef_quat"])
    if yaw is None:
        yaw = hand_yaw(R)
    a[3:6] = np.clip(ROT_GAIN * axis_angle(rot_z(yaw) @ R_DOWN @ R.T), -1.0, 1.0)
    a[6] = gripper
    return a


class _TurnOn:
    """Turn a knob (a hinge about a vertical axis) into its turn-on range: grasp its grip bar from above on the
    hinge axis, and turn the hand about the vertical."""

    def __init__(self, fixture: str, episode: _Episode):
        self.fixture, self.ep = fixture, episode
        self.phase, self.t = "plan", 0
        self.attempts = 0

    def _go(self, phase):
        self.phase, self.t = phase, 0

    def step(self, obs, v: _View):
        self.t += 1
        s = v.s
        joint = _knob_joint(s, self.fixture)
        art = s["articulations"][joint]
        q = art["qpos"]
        ranges = s["articulation_ranges"][self.fixture]
        on = next(r for k, r in ranges.items() if "turnon" in k)
        q_goal = min(on) + 0.35 * (max(on) - min(on))
        eef = np.asarray(obs["robot0_eef_pos"], dtype=float)
        R = quat_xyzw_to_mat(obs["robot0_eef_quat"])
        sign = 1.0 if art["axis"][2] >= 0 else -1.0  # a positive hand yaw turns the knob by +sign

        if self.phase == "plan":
            self.attempts += 1
            body = art["body"]
            mask = np.asarray(s["geom_body"]) == body
            c, m, h = v.boxes(mask)
            lo, hi = world_aabbs(c, m, h)
            k = int(np.argmax(hi[:, 2]))  # the grip bar: the knob's highest geom
            # fingers across the bar's thinnest horizontal axis
            axes = [m[k][:, a] for a in range(3)]
            horiz = [(h[k][a] * math.hypot(axes[a][0], axes[a][1]), a) for a in range(3)
                     if math.hypot(axes[a][0], axes[a][1]) > 0.5]
            a = min(horiz)[1]
            u = axes[a].copy()
            u[2] = 0.0
            u /= np.linalg.norm(u)
            self.point = np.array([art["anchor"][0], art["anchor"][1], hi[k, 2] - 0.012])
            self.turn = sign * (q_goal - q)
            self.yaw = choose_yaw(yaw_for_axis(u), hand_yaw(R), float(obs["robot0_joint_pos"][6]),
                                  np.asarray(s["robot_base"])[:2], eef[:2], self.point[:2], extra_turn=self.turn)
            self._go("approach")

        if self.phase == "approach":
            target = self.point + np.array([0.0, 0.0, HOVER])
            if np.linalg.norm(target[:2] - eef[:2]) > 0.04:
                target[2] = max(target[2], eef[2])
            yaw_err = abs(wrap(hand_yaw(R) - self.yaw))
            if (np.linalg.norm((target - eef)[:2]) < 0.006 and abs(target[2] - eef[2]) < 0.02 and yaw_err < 0.08) \
                    or self.t > 60:
                self._go("descend")
            return move_action(obs, target, self.yaw, OPEN)
        if self.phase == "descend":
            if np.linalg.norm(self.point - eef) < 0.005 or self.t > 25:
                self._go("close")
            return move_action(obs, self.point, self.yaw, OPEN)
        if self.phase == "close":
            if self.t >= 9:
                self.yaw_start = hand_yaw(R)
                self.q_start = q
                self._go("turn")
            return move_action(obs, self.point, self.yaw, CLOSE)
        if self.phase == "turn":
            done = (q - q_goal) * 1.0 >= 0.0
            if done or self.t > 40:
                self._go("release")
            return move_action(obs, self.point, wrap(self.yaw_start + sign * (q_goal + 0.15 - self.q_start)), CLOSE)
        if self.phase == "release":
            if self.t >= 6:
                self.retreat_to = eef + np.array([0.0, 0.0, 0.10])
                self._go("retreat")
            return move_action(obs, eef, None, OPEN)
        if self.phase == "retreat":
            if self.t >= 10:
                if q < min(on) and self.attempts < 3:  # it slipped out of the fingers: try again
                    self._go("plan")
                    return move_action(obs, self.retreat_to, None, OPEN)
                return None
            return move_action(obs, self.retreat_to, None, OPEN)
        raise AssertionError(f"unknown phase {self.phase}")


class _PickPlace:
    """Pick `obj` and put it on / in `dest` (an entity or a region site, or a world xy point on what is below it)."""

    APPROACH_TIMEOUT = 60
    DESCEND_TIMEOUT = 25
    MAX_ATTEMPTS = 6
    RETREAT_STEPS = 10  # up from the released object before the next skill

    def __init__(self, obj: str, dest: str, relation: str, episode: _Episode):
        self.obj, self.dest, self.relation, self.ep = obj, dest, relation, episode
        self.phase = "plan"
        self.t = 0  # steps in the current phase
        self.failed: set[int] = set()
        self.attempts = 0
        self.grasp = None  # (point in object frame, world finger axis, yaw, candidate index)
        self.width_before: float | None = None  # the finger gap one step ago, while closing ("decisive")
        self.share: tuple[int, int] | None = None  # (k, n): the k-th of n objects put On the same region

    def _go(self, phase):
        self.phase, self.t = phase, 0
        self.regrasp_to = None

    # -- facts ------------------------------------------------------------------------------------------------
    def _obj_state(self, v: _View):
        i = v.index(self.obj)
        return i, v.s["pos"][i], v.s["mat"][i]

    def _dest_xy_and_floor(self, v: _View, obj_bottom: float):
        """Where the object's origin should end up (xy) and the top of what it will rest on there."""
        i = v.index(self.obj)
        if not isinstance(self.dest, str):  # a point on the table (skills that move an object out of the way)
            xy = np.asarray(self.dest, dtype=float)[:2]
        elif self.dest in v.s["sites"]:
            site = v.s["sites"][self.dest]
            xy = np.asarray(site["pos"][:2], dtype=float)
            from . import skills

            shift = skills.place_offset(self.dest, v)  # a drawer: towards its open side
            if shift is not None:
                xy = xy + shift
            if self.share is not None:  # one of several objects going on this region: its own part of it
                k, n = self.share
                half = np.asarray(site.get("half", np.zeros(3)), dtype=float)[:2]
                xy = xy + (k - (n - 1) / 2) * 2 / max(n - 1, 1) * SHARED_SPREAD * half
        else:
            xy = v.s["pos"][v.index(self.dest)][:2].astype(float)
        c, m, h = v.boxes(~v.own(i))
        lo, hi = world_aabbs(c, m, h)
        under = ((lo[:, 0] - 0.005 <= xy[0]) & (xy[0] <= hi[:, 0] + 0.005) & (lo[:, 1] - 0.005 <= xy[1])
                 & (xy[1] <= hi[:, 1] + 0.005) & (hi[:, 2] < obj_bottom + 0.005))
        floor = float(hi[under, 2].max()) if under.any() else obj_bottom - 0.10
        return xy, floor

    def _carry_bottom(self, v: _View, start_xy, end_xy) -> float:
        """The height the object's bottom must keep while carried from start_xy to end_xy: above everything near
        the straight path."""
        i = v.index(self.obj)
        lo, hi = world_aabbs(*v.boxes(~v.own(i)))
        a, b = np.asarray(start_xy), np.asarray(end_xy)
        n = 12
        pts = a[None] + (b - a)[None] * np.linspace(0, 1, n)[:, None]
        margin = 0.06
        near = np.zeros(len(lo), dtype=bool)
        for p in pts:
            near |= ((lo[:, 0] - margin <= p[0]) & (p[0] <= hi[:, 0] + margin)
                     & (lo[:, 1] - margin <= p[1]) & (p[1] <= hi[:, 1] + margin))
        top = float(hi[near, 2].max()) if near.any() else 0.9
        return top + 0.04

    def _candidates(self, v: _View):
        """Candidate grasps: (grasp point, finger axis, side direction) in the world frame."""
        i, p, R = self._obj_state(v)
        lo, hi = v.local_extent(i)
        wlo, whi = v.world_extent(i)
        bottom, top = float(wlo[2]), float(whi[2])
        up = int(np.argmax(np.abs(R[2, :])))  # the body axis closest to vertical: objects may lie on a side
        across = [a for a in range(3) if a != up]
        centre = p + R @ ((lo + hi) / 2)
        cands = []
        if min(hi[a] - lo[a] for a in across) > BODY_GRASP_WIDTH:
            # too wide for the fingers: pinch the rim wall at the radius of the geoms that form the top band
            c, m, h = v.boxes(v.own(i))
            top_band = (c[:, 2] + np.einsum("nj,nj->n", np.abs(m[:, 2, :]), h)) > top - 0.015
            radii = np.linalg.norm((c[top_band] - centre)[:, :2], axis=1)
            if top_band.any() and float(np.median(radii)) < CLOSED_TOP_RADIUS:
                handles = self._handle_grasps(v, i, centre)  # no rim to pinch (a moka pot's lid): its handle
                if handles:
                    return handles
            r = float(np.median(radii)) if top_band.any() else float(min(hi[a] - lo[a] for a in across) / 2)
            z = top - 0.02
            for k in range(8):
                ang = k * math.pi / 4
                u = np.array([math.cos(ang), math.sin(ang), 0.0])
                cands.append((np.array([centre[0], centre[1], z]) + r * u, u, u))
        else:
            # across the body, low enough for a firm hold, high enough for the finger pads to stay off the floor
            # (tall bottles deeper, below the neck, as deep as the fingers reach under the palm)
            depth = 0.035 if top - bottom > 0.08 else 0.025
            z = min(max(top - depth, bottom + 0.012), top - 0.005)
            point = np.array([centre[0], centre[1], z])
            for a in across:
                if hi[a] - lo[a] > BODY_GRASP_WIDTH:
                    continue
                u = R[:, a].copy()
                u[2] = 0.0
                if np.linalg.norm(u) < 1e-6:
                    continue
                u /= np.linalg.norm(u)
                cands.append((point, u, u))
                cands.extend(self._shifted(v, i, point, u, R, lo, hi, a))
        return cands

    def _shifted(self, v: _View, i: int, point, u, R, lo, hi, a) -> list:
        """When the hand of a grasp across the body would run into a neighbour (its 21 cm length along the fingers),
        the same grasp moved along the object's other side (up to SHIFT_ALONG, the fingers staying SHIFT_END inside
        its end) or a little along the fingers (SHIFT_ACROSS: the closing fingers drag the object that far): a cream
        cheese box beside a milk carton, butter beside the basket (LIBERO-10 task2, 4 of 50 tried the one blocked
        grasp until the time ran out). [] when the centred grasp is free."""
        obstacles = v.obstacles(i, self._bottom(v, i) + 0.005)
        if gripper_clearance(point, u, *obstacles) > SHIFT_IF_WITHIN:
            return []
        up = int(np.argmax(np.abs(R[2, :])))
        other = 3 - a - up  # the body's other horizontal axis
        w = R[:, other].copy()
        w[2] = 0.0
        w /= max(np.linalg.norm(w), 1e-9)
        room = max(float(hi[other] - lo[other]) / 2 - SHIFT_END, 0.0)
        shifts = [w * d for d in np.linspace(-min(room, SHIFT_ALONG), min(room, SHIFT_ALONG), 5) if abs(d) > 1e-6]
        shifts += [u * SHIFT_ACROSS, -u * SHIFT_ACROSS]
        return [(point + shift, u, u) for shift in shifts]

    @staticmethod
    def _bottom(v: _View, i: int) -> float:
        """The lowest point of object i in the world. (Its origin plus its extent along its own z, used before, is
        wrong for an object whose body z is not up: LIBERO's milk carton lies along another axis, and the lift of
        libero_object task8 stopped 6 cm short, so the carried carton pushed the basket away.)"""
        return float(v.world_extent(i)[0][2])

    def _handle_grasps(self, v: _View, i: int, centre) -> list:
        """Grasps across the narrow parts that stick out of an object too wide to grasp whole (a moka pot's handle):
        a geom at most HANDLE_WIDTH across and off the centre, the tallest first; the grip site sits low enough for
        the fingers to close on it and high enough for the palm to clear the top of what is under the hand."""
        lo, hi = world_aabbs(*v.boxes(v.own(i)))
        size = hi - lo
        found = []
        for k in range(len(lo)):
            narrow = int(np.argmin(size[k, :2]))
            mid = (lo[k] + hi[k]) / 2
            if size[k, narrow] > HANDLE_WIDTH or size[k, 1 - narrow] < HANDLE_WIDTH:
                continue
            if np.linalg.norm(mid[:2] - centre[:2]) < HANDLE_OFF_CENTRE or size[k, 2] < HANDLE_MIN_HEIGHT:
                continue
            if size[k, 2] > HANDLE_MAX_SHARE * (hi[:, 2].max() - lo[:, 2].min()):
                continue  # as tall as the object: a wall of its body
            under = overlap_xy(lo[k], hi[k], lo, hi)
            z = float(hi[under, 2].max()) - PALM_ABOVE
            u = np.zeros(3)
            u[narrow] = 1.0
            found.append((size[k, 2], (np.array([mid[0], mid[1], z]), u, u)))
            found.append((size[k, 2], (np.array([mid[0], mid[1], z]), -u, -u)))
        found.sort(key=lambda f: -f[0])
        return [grasp for _, grasp in found]

    def _blocked_at_destination(self, v: _View, cands) -> set:
        """The candidates whose hand would run into a fixture where the object is put down (a cabinet beside the
        plate: a bowl pinched on its side towards the cabinet put the hand's 21 cm length into the cabinet's side, and
        the arm stalled 5 cm short; LIBERO-Goal task9, 3 of 50), when not all would. Only for a destination that is
        an object: on a region of a fixture (the frying pan on top of the shelf) it cost libero_90 task42 4 of 5."""
        if not isinstance(self.dest, str) or self.dest not in v.names:
            return set()  # a spot on the open table, or a region (a fixture's own top: the hand belongs near it)
        i, p, R = self._obj_state(v)
        bottom = self._bottom(v, i)
        dest_xy, floor = self._dest_xy_and_floor(v, bottom)
        fixture = np.asarray(v.s["is_fixture"], dtype=bool)[np.asarray(v.s["geom_owner"])] & ~v.own(i)
        c, m, h = v.boxes(fixture)
        lo, _ = world_aabbs(c, m, h)
        keep = lo[:, 2] > floor + 0.005  # not what the object will stand on
        if not keep.any():
            return set()
        move = np.array([*(dest_xy - p[:2]), floor + PLACE_CLEARANCE - bottom])
        blocked = {k for k, (point, axis, _) in enumerate(cands)
                   if hand_clearance(point + move, axis, c[keep], m[keep], h[keep]) < BLOCKED_WITHIN}
        return blocked if len(blocked) < len(cands) else set()

    def _escape(self, v: _View, eef) -> np.ndarray | None:
        """The horizontal shift that takes the gripped object and the hand out from under whatever is above them
        (geometry.escape_shift); zero when the way up is free."""
        i = v.index(self.obj)
        wlo, whi = v.world_extent(i)
        others = ~v.own(i)
        lo, hi = world_aabbs(*v.boxes(others))
        # a body is above the object when all of it is (an open drawer), not when only its upper parts are (the
        # handle of a moka pot standing beside a frying pan)
        body = np.asarray(v.s["geom_body"])[others]
        lowest = {b: lo[body == b, 2].min() for b in set(body.tolist())}
        bottom_of_body = np.array([lowest[b] for b in body.tolist()])
        above = (bottom_of_body > whi[2] - 0.005) & (bottom_of_body < whi[2] + ESCAPE_ABOVE)
        beside = (lo[:, 2] < whi[2]) & (hi[:, 2] > wlo[2] + 0.005)
        footprints = [(wlo[:2], whi[:2]), hand_footprint(eef[:2], self.grasp_axis)]
        return escape_shift(footprints, lo[above], hi[above], lo[beside], hi[beside])

    def _others_z(self, v: _View) -> np.ndarray:
        movable = ~np.asarray(v.s["is_fixture"], dtype=bool)
        movable[v.index(self.obj)] = False
        return np.asarray(v.s["pos"])[movable, 2].copy()

    # -- the state machine ------------------------------------------------------------------------------------
    def step(self, obs, v: _View):
        self.t += 1
        eef = np.asarray(obs["robot0_eef_pos"], dtype=float)
        i, p, R = self._obj_state(v)
        width = float(obs["robot0_gripper_qpos"][0] - obs["robot0_gripper_qpos"][1])

        if self.phase == "plan":
            self.attempts += 1
            cands = self._candidates(v)
            if not cands or self.attempts > self.MAX_ATTEMPTS:
                return None
            if len(self.failed) >= len(cands):
                self.failed.clear()
            obstacles = v.obstacles(i, self._bottom(v, i) + 0.005)
            base = np.asarray(v.s["robot_base"], dtype=float)
            toward = base - p
            toward[2] = 0.0
            toward /= max(np.linalg.norm(toward), 1e-9)
            k = choose_grasp(cands, obstacles, toward, exclude=self.failed | self._blocked_at_destination(v, cands))
            if k is None:  # the ones left free at the destination have all failed: any not failed yet
                k = choose_grasp(cands, obstacles, toward, exclude=self.failed)
            point, axis, _ = cands[k]
            Rcur = quat_xyzw_to_mat(obs["robot0_eef_quat"])
            yaw = choose_yaw(yaw_for_axis(axis), hand_yaw(Rcur), float(obs["robot0_joint_pos"][6]),
                             base[:2], eef[:2], point[:2])
            self.grasp = ((point - p) @ R, yaw, k)
            self.grasp_axis = axis
            self._go("approach")

        local, yaw, k = self.grasp
        g = p + R @ local  # the grasp point follows the object if it moves

        if self.phase == "approach":
            xy_err = float(np.linalg.norm(g[:2] - eef[:2]))
            target = g + np.array([0.0, 0.0, approach_height(xy_err, self.ep.funnel)])
            if xy_err > 0.04:
                target[2] = max(target[2], eef[2])  # go over, then down
            err = target - eef
            yaw_err = abs(wrap(hand_yaw(quat_xyzw_to_mat(obs["robot0_eef_quat"])) - yaw))
            # gated: over the grasp point at the hover height; funnel: over it at whatever height the funnel has
            # reached (at most HOVER * 0.006 / FUNNEL_GRASP_XY = 1.5 cm above it, so the descent's target moves
            # by at most that)
            if np.linalg.norm(err[:2]) < 0.006 and yaw_err < 0.08 and (self.ep.funnel or abs(err[2]) < 0.02):
                self._go("descend")
            elif self.t > self.APPROACH_TIMEOUT:
                self.failed.add(k)
                self._go("plan")
            return move_action(obs, target, yaw, OPEN)

        if self.phase == "descend":
            if np.linalg.norm(g - eef) < CLOSE_WITHIN[self.ep.decisive] or self.t > self.DESCEND_TIMEOUT:
                self._go("close")
                self.width_before = width
            return move_action(obs, g, yaw, OPEN)

        if self.phase == "close":
            # "decisive": lift as soon as the fingers stop (closed on something or on nothing), not after a fixed
            # count: frames of a still hand on a gripped object would otherwise show "hold" before "lift"
            stopped = (self.ep.decisive and self.t >= 3 and self.width_before is not None
                       and abs(width - self.width_before) < FINGERS_STOPPED)
            self.width_before = width
            if self.t >= 10 or stopped:
                if width < 0.0025:  # closed on nothing
                    self.failed.add(k)
                    self._go("regrasp")
                else:
                    self.lift_from = float(p[2])
                    self.lift_eef = eef.copy()
                    self.others_z = self._others_z(v)
                    shift = self._escape(v, eef)
                    if shift is not None and np.linalg.norm(shift) > 0:
                        self.slide_to = eef + np.array([shift[0], shift[1], SLIDE_RISE])
                        self.slide_obj_from = p.copy()
                        self._go("slide")
                    else:
                        self._go("lift")
            return move_action(obs, g, yaw, CLOSE)

        if self.phase == "slide":  # out from under an overhang, just above where the object stood
            moved_hand = eef - self.lift_eef
            moved_obj = p - self.slide_obj_from
            if np.linalg.norm((moved_obj - moved_hand)[:2]) > 0.03:  # it stays behind: the grip is lost
                self.failed.add(k)
                self._go("regrasp")
            elif np.linalg.norm((self.slide_to - eef)[:2]) < 0.01 or self.t > 40:
                self.lift_from = float(p[2])
                self.lift_eef = eef.copy()
                self._go("lift")
            return move_action(obs, self.slide_to, yaw, CLOSE)

        if self.phase == "lift":
            if self.ep.fumble and self.t >= 3:
                self.ep.gave_up = True  # the deliberate fumble: let go and stop trying
                return move_action(obs, eef, yaw, OPEN)
            bottom = self._bottom(v, i)
            dest_xy, _ = self._dest_xy_and_floor(v, bottom)
            self.carry_bottom = self._carry_bottom(v, p[:2], dest_xy)
            target = np.array([self.lift_eef[0], self.lift_eef[1],
                               eef[2] + (self.carry_bottom - bottom)])
            rise = p[2] - self.lift_from
            if rise > 0.01 and np.any(self._others_z(v) - self.others_z > 0.015):
                # another object comes up with ours (wedged under it or pinched too): put it back, try elsewhere
                self.failed.add(k)
                self._go("putback")
            elif rise > 0.03 and bottom > self.carry_bottom - 0.03:
                self._go("transport")
            elif self.t > 8 and rise < 0.01:
                self.failed.add(k)
                self._go("regrasp")
            elif self.t > 40:
                self._go("transport")
            return move_action(obs, target, yaw, CLOSE)

        bottom = self._bottom(v, i)
        if self.phase in ("transport", "lower") and (width < 0.0015 or eef[2] - p[2] > 0.15):
            self.failed.add(k)  # the object slipped out
            self._go("regrasp")

        if self.phase == "transport":
            dest_xy, floor = self._dest_xy_and_floor(v, bottom)
            target = eef.copy()
            target[:2] += dest_xy - p[:2]
            carry = carry_height(self.carry_bottom, floor, float(np.linalg.norm(dest_xy - p[:2])), self.ep.funnel)
            target[2] = eef[2] + (carry - bottom)
            if np.linalg.norm(dest_xy - p[:2]) < 0.01 or self.t > 80:
                self.z_hist = []
                self._go("lower")
            return move_action(obs, target, yaw, CLOSE)

        if self.phase == "lower":
            dest_xy, floor = self._dest_xy_and_floor(v, bottom)
            target = eef.copy()
            target[:2] += dest_xy - p[:2]
            target[2] = eef[2] + (floor + PLACE_CLEARANCE - bottom)
            self.z_hist.append(float(eef[2]))
            stalled = len(self.z_hist) > 4 and self.z_hist[-4] - self.z_hist[-1] < 0.003
            # going lower would put the hand on a container's wall: let the object drop from here
            blocked = hand_clearance(eef - np.array([0.0, 0.0, 0.01]), self.grasp_axis,
                                     *v.obstacles(i, -np.inf)) < 0.004
            if bottom < floor + RELEASE_ABOVE[self.ep.decisive] or stalled or blocked or self.t > 40:
                self._go("release")
            return move_action(obs, target, yaw, CLOSE)

        if self.phase == "release":
            if self.t >= 6:
                self.retreat_to = eef + np.array([0.0, 0.0, 0.10])
                self._go("retreat")
            return move_action(obs, eef, yaw, OPEN)

        if self.phase == "retreat":
            if self.t >= self.RETREAT_STEPS:
                return None
            return move_action(obs, self.retreat_to, yaw, OPEN)

        if self.phase == "putback":
            if self.t > 12 or eef[2] < self.lift_eef[2] + 0.005:
                self._go("regrasp")
            return move_action(obs, self.lift_eef + np.array([0.0, 0.0, 0.003]), yaw, CLOSE)

        if self.phase == "regrasp":
            if self.regrasp_to is None:
                self.regrasp_to = eef + np.array([0.0, 0.0, 0.06])
            target = self.regrasp_to
            if self.t >= 8:
                self._go("plan")
            return move_action(obs, target, yaw, OPEN)

        raise AssertionError(f"unknown phase {self.phase}")
