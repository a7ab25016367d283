"""Put an object In a region under a roof (LIBERO's microwave: In(mug, microwave_1_heating_region)).

A top-down hand cannot put anything there: the roof is 14 cm above the floor, and the hand stands on top of what it
holds. So the object goes in two moves, and the hand never passes under the roof:
1. `_IntoMouth`: a pick-and-place by the part that sticks out of the object (a mug's handle), turned away from the
   opening, that carries it to the outside of the mouth at the height of the inside floor and slides it in until the
   hand's leading edge is at the mouth; it lets go with the object's centre past the floor's edge.
2. `_PushIn`: the hand turned horizontal, pointing in, its closed fingertips (1.3 cm ahead of the grip site, the hand
   body 2.4 cm behind it) push the object's trailing side along the floor, until the object's origin lies inside
   the region and its trailing side is past the mouth by DOOR_CLEARANCE (a door can then close).

The region's open side is the one of its four horizontal faces that no wall of the fixture (its door aside) stands
beyond.
"""
from __future__ import annotations

import numpy as np

from ..expert_geometry import R_DOWN, rot_z, world_aabbs, yaw_for_axis
from ..expert_phases import CLOSE, OPEN, PALM_ABOVE, _PickPlace, move_action
from ..scripted import _View
from .drawer import hand_frame, pose_action, reach, rotation_error

WALL_REACH = 0.06  # a fixture box this far beyond a face of the region walls that side (m)
HAND_BEHIND = 0.024  # the hand body starts this far behind the grip site along the approach (GRIPPER_BOXES)
HAND_ACROSS = 0.035  # and reaches this far either side of it across the fingers
FINGERTIP_AHEAD = 0.013  # the closed fingertips reach this far ahead of the grip site
MOUTH_MARGIN = 0.006  # the hand's leading edge stops this far outside the mouth (m)
FLOOR_CLEARANCE = 0.012  # the carried object's bottom this far above the inside floor (m)
STAGE = 0.10  # the object is lowered to the floor's height this far outside the mouth (m)
PUSH_HEIGHT = 0.5  # the fingertips push at this share of the object's height
DOOR_CLEARANCE = 0.02  # the pushed object's trailing side ends this far inside the mouth (m)
ROOF_REACH = 0.05  # a fixture box over the region whose bottom is at most this far above the region's top roofs it (m)
STICKS_OUT = 0.012  # geoms this far beyond the object's body radius form its handle (m)


class Enclosure:
    """The region's box, the fixture's floor and roof under and over it, its open side (unit `inward`, pointing into
    it) and the mouth: the plane where the floor ends on that side (`mouth`, its distance along `inward`)."""

    def __init__(self, v: _View, region: str):
        site = v.s["sites"][region]
        self.region = region
        self.centre = np.asarray(site["pos"], dtype=float)
        mat = np.asarray(site.get("mat", np.eye(3)), dtype=float)
        self.half = np.abs(mat) @ np.asarray(site["half"], dtype=float)  # LIBERO's in_box test, world aligned
        self.fixture = site.get("parent")
        i = v.index(self.fixture)
        walls = v.own(i) & ~door_bodies(v, self.fixture)
        self.lo, self.hi = world_aabbs(*v.boxes(walls))
        over = _covers(self.lo, self.hi, self.centre)
        above = over & (self.lo[:, 2] > self.centre[2]) & (self.lo[:, 2] < self.centre[2] + self.half[2] + ROOF_REACH)
        self.roof = float(self.lo[above, 2].min(initial=np.inf))
        under = over & (self.hi[:, 2] <= self.centre[2])
        self.floor = float(self.hi[under, 2].max(initial=-np.inf))
        self.inward = None
        self.mouth = None
        base = np.asarray(v.s["robot_base"], dtype=float)
        open_sides = []
        for u in (np.array([1.0, 0, 0]), np.array([-1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, -1.0, 0])):
            face = float(np.dot(self.half, np.abs(u)))
            ray = [self.centre + u * (face + s) for s in np.linspace(0.0, WALL_REACH, 7)]
            if not any(_covers(self.lo, self.hi, p, z=True).any() for p in ray):
                open_sides.append(u)
        floor_geoms = under & (self.hi[:, 2] >= self.floor - 1e-6)
        if open_sides and floor_geoms.any():  # the open side facing the robot, if several
            out = max(open_sides, key=lambda u: float(np.dot(u[:2], base[:2] - self.centre[:2])))
            self.inward = -out
            self.mouth = float(min(np.minimum(self.lo[floor_geoms] @ self.inward,
                                              self.hi[floor_geoms] @ self.inward)))

    @property
    def roofed(self) -> bool:
        return np.isfinite(self.roof) and np.isfinite(self.floor) and self.inward is not None

    def contains(self, point) -> bool:
        return bool(np.all(np.abs(np.asarray(point, dtype=float) - self.centre) <= self.half))


def _covers(lo, hi, point, z: bool = False) -> np.ndarray:
    """Which boxes contain `point` in xy (and in z too, when asked)."""
    inside = (lo[:, 0] <= point[0]) & (point[0] <= hi[:, 0]) & (lo[:, 1] <= point[1]) & (point[1] <= hi[:, 1])
    if z:
        inside &= (lo[:, 2] <= point[2]) & (point[2] <= hi[:, 2])
    return inside


def door_bodies(v: _View, fixture: str) -> np.ndarray:
    """A geom mask of the fixture's hinged or sliding parts (a door swings out of the way; it is no wall)."""
    bodies = {art["body"] for art in v.s["articulations"].values() if art["owner"] == fixture}
    return np.isin(np.asarray(v.s["geom_body"]), list(bodies))


def into_enclosure(pred, view: _View, episode):
    """[_IntoMouth, _PushIn] for In(X, REGION) when REGION lies under a roof of its fixture, else None."""
    if len(pred) != 3 or pred[0] != "in" or pred[1] not in view.names or pred[2] not in view.s["sites"]:
        return None
    if view.s["sites"][pred[2]].get("parent") not in view.names or pred[2] in view.s["site_joints"]:
        return None  # a drawer's region moves with it, and the drawer skills open it first
    place = Enclosure(view, pred[2])
    if not place.roofed:
        return None
    return [_IntoMouth(pred[1], place, episode), _PushIn(pred[1], pred[2], episode)]


class _IntoMouth(_PickPlace):
    """Pick-and-place to just inside the mouth: by the object's handle when it has one (the hand then trails the
    object), lowered to the inside floor's height outside the mouth, then slid in."""

    def __init__(self, obj: str, place: Enclosure, episode):
        super().__init__(obj, place.region, "in", episode)
        self.place = place

    def _candidates(self, v: _View):
        i, p, R = self._obj_state(v)
        handle = protruding_grasps(v, i, self.place.inward)
        return handle or super()._candidates(v)

    def _final_xy(self, v: _View) -> np.ndarray:
        """Where the object's origin goes: as far in as the hand's leading edge allows."""
        i, p, R = self._obj_state(v)
        local, _, _ = self.grasp
        grip = p + R @ local
        inward = self.place.inward
        lead = HAND_ACROSS if abs(np.dot(self.grasp_axis[:2], inward[:2])) < 0.7 else 0.104
        ahead = float(np.dot(p - grip, inward))  # how far the origin leads the grip site
        along = self.place.mouth - MOUTH_MARGIN - lead + ahead
        lateral = self.place.centre - inward * float(np.dot(self.place.centre, inward))
        return (lateral + inward * along)[:2]

    def _dest_xy_and_floor(self, v: _View, obj_bottom: float):
        if self.grasp is None:
            return self.place.centre[:2], self.place.floor
        return self._final_xy(v) - self.place.inward[:2] * STAGE, self.place.floor

    def step(self, obs, v: _View):
        if self.phase not in ("lower", "enter"):
            return super().step(obs, v)
        self.t += 1
        eef = np.asarray(obs["robot0_eef_pos"], dtype=float)
        i, p, R = self._obj_state(v)
        local, yaw, k = self.grasp
        width = float(obs["robot0_gripper_qpos"][0] - obs["robot0_gripper_qpos"][1])
        if width < 0.0015 or eef[2] - p[2] > 0.15:
            self.failed.add(k)  # the object slipped out
            self._go("regrasp")
            return move_action(obs, eef, yaw, OPEN)
        bottom = self._bottom(v, i)
        final = self._final_xy(v)
        goal = final - self.place.inward[:2] * STAGE if self.phase == "lower" else final
        target = eef.copy()
        target[:2] += goal - p[:2]
        target[2] = eef[2] + (self.place.floor + FLOOR_CLEARANCE - bottom)
        if self.phase == "lower":
            if abs(bottom - self.place.floor - FLOOR_CLEARANCE) < 0.006 or self.t > 40:
                self._go("enter")
        elif np.linalg.norm(goal - p[:2]) < 0.008 or self.t > 40:
            self._go("release")
        return move_action(obs, target, yaw, CLOSE)


def protruding_grasps(v: _View, i: int, inward) -> list:
    """Grasps of what sticks out of an object's body (a mug's handle) on its side facing out of the opening: at the
    outermost of the geoms whose centres lie STICKS_OUT beyond the body's median radius (the handle's outer bar;
    nearer the body, the fingers would land on its rim), the fingers closing across the way it sticks out. []
    when there is nothing, or it does not face out."""
    c, m, h = v.boxes(v.own(i))
    lo, hi = world_aabbs(c, m, h)
    centre = np.median(c, axis=0)
    radii = np.linalg.norm((c - centre)[:, :2], axis=1)
    if not (radii > np.median(radii) + STICKS_OUT).any():
        return []
    outer = int(np.argmax(radii))
    radial = np.array([*(c[outer] - centre)[:2], 0.0]) / radii[outer]
    if np.dot(radial, np.asarray(inward, dtype=float)) > -0.5:
        return []  # it does not trail: the hand would lead the object in
    u = np.cross([0.0, 0.0, 1.0], radial)
    point = np.array([c[outer][0], c[outer][1], float(hi[:, 2].max()) - PALM_ABOVE])  # the palm clears the rim
    return [(point, u, u), (point, -u, -u)]


class _PushIn:
    """Push an object along the inside floor with the fingertips of the horizontal hand, pointing in."""

    MAX_ATTEMPTS = 2

    def __init__(self, obj: str, region: str, episode):
        self.obj, self.region, self.ep = obj, region, episode
        self.phase, self.t, self.attempts = "plan", 0, 0
        self.finger_sign: float | None = None

    def _go(self, phase):
        self.phase, self.t = phase, 0

    def _done(self, place: Enclosure, v: _View, i: int) -> bool:
        lo, hi = world_aabbs(*v.boxes(v.own(i)))
        trailing = float(np.min(np.minimum(lo @ place.inward, hi @ place.inward)))
        return place.contains(v.s["pos"][i]) and trailing > place.mouth + DOOR_CLEARANCE

    def step(self, obs, v: _View):
        self.t += 1
        place = Enclosure(v, self.region)
        i = v.index(self.obj)
        eef = np.asarray(obs["robot0_eef_pos"], dtype=float)
        inward = place.inward
        lo, hi = world_aabbs(*v.boxes(v.own(i)))
        trailing = float(np.min(np.minimum(lo @ inward, hi @ inward)))
        olo, ohi = lo.min(0), hi.max(0)
        centre = (olo + ohi) / 2
        across = np.cross([0.0, 0.0, 1.0], inward)
        if self.phase == "plan":
            if self._done(place, v, i) or self.attempts >= self.MAX_ATTEMPTS:
                return None
            self.attempts += 1
            self.finger_sign = None
            self._go("turn")
        if self.finger_sign is None:
            self.finger_sign = min((1.0, -1.0), key=lambda k: rotation_error(obs, hand_frame(inward, k * across)))
        R_target = hand_frame(inward, self.finger_sign * across)
        z = float(olo[2]) + PUSH_HEIGHT * float(ohi[2] - olo[2])
        # the grip site on the object's trailing side, at its middle across the mouth
        lateral = float(np.dot(centre, across))
        def point(along: float) -> np.ndarray:
            return across * lateral + inward * along + np.array([0.0, 0.0, z])
        behind = point(trailing - FINGERTIP_AHEAD - 0.05)
        limit = place.mouth + HAND_BEHIND - MOUTH_MARGIN  # the grip site's farthest reach: the hand stays out
        if self.phase == "turn":  # turn horizontal above the object's trailing side, then come down behind it
            target = behind.copy()
            target[2] = max(z + 0.10, float(ohi[2]) + 0.12)
            return reach(self, obs, eef, target, R_target, CLOSE, 0.02, 60, "down", turned=True)
        if self.phase == "down":
            return reach(self, obs, eef, behind, R_target, CLOSE, 0.01, 40, "push")
        if self.phase == "push":
            depth = float(np.dot(eef, inward))
            if self._done(place, v, i) or depth > limit - 0.003 or self.t > 80:
                self.back_to = eef - inward * 0.08
                self._go("back")
            along = min(trailing - FINGERTIP_AHEAD + 0.03, limit)
            return pose_action(obs, point(along), R_target, CLOSE)
        if self.phase == "back":
            if self.t >= 12:
                self._go("turn_down")
            return pose_action(obs, self.back_to, R_target, CLOSE)
        if self.phase == "turn_down":
            yaw = yaw_for_axis(across)
            up = self.back_to + np.array([0.0, 0.0, 0.08])
            if rotation_error(obs, rot_z(yaw) @ R_DOWN) < 0.2 or self.t > 40:
                self._go("plan")
            return move_action(obs, up, yaw, OPEN)
        raise AssertionError(f"unknown phase {self.phase}")
