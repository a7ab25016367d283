"""Kind `scripted`: a scripted expert that reads privileged simulator state and solves LIBERO tasks.

It outputs the same 7-dim OSC_POSE delta actions a model would (position and axis-angle deltas in [-1, 1], gripper
-1 open / +1 close), computed from obs["scene"] (vla_bench/envs/scene.py) and the robot's proprioception. What it
knows how to do is read from the task's BDDL goal predicates, not from the instruction text:

- On(X, Y) / In(X, Y) with X a movable object: pick X, carry it over Y (an object or a region site), lower it until
  it rests, open.

Grasps are top-down. An object too wide for the 0.08 m opening (a bowl) is pinched at its rim wall, one finger
inside and one outside; anything narrower is grasped across its body. Of the candidate grasps, the one whose
gripper (hand and open fingers, modelled as boxes) keeps the most clearance from every other collision geom is
taken, ties going to the side that faces the robot, and another is tried if the object does not come up. Of the
two equivalent gripper yaws (the fingers are symmetric under a half turn), the one that keeps joint 7 farthest
from its limit is taken: with the other, the arm can stall short of the target for good. Motion is closed-loop
proportional control on the grip site and the hand orientation; open-loop motion drifts in this controller.

Motion (`motion`): "gated" (the default) moves in phases that switch on precise conditions: approach until the
hand is within 6 mm over the grasp point and at the grasp yaw, then descend; carry at a safe height until the object
is within 1 cm over its destination, then lower. "funnel" makes the height a continuous function of the horizontal
error instead: the hand descends as it closes in on the grasp point (HOVER at FUNNEL_GRASP_XY and beyond, the grasp
height at 0), and the carried object descends as it closes in on its destination (the carry height at
FUNNEL_PLACE_XY and beyond). The descent phase then starts over the grasp point at most 1.5 cm above it instead of
at HOVER, and the lowering phase at most a third of the carry height above the resting height; the other
conditions that end a phase stay (the descent's timeout included: in the drawer and on the stove the hand stalls
~1 cm above the grasp point, and the gripper closes there). The point is
demos a policy can learn from an image: under "gated", the same state (right over the grasp point at HOVER) shows
two different actions (hold, then descend), which a camera cannot tell apart, and a cloned policy can hover there;
under "funnel", nearby states get nearby actions.
"decisive" is "funnel" with gripper switches that leave margins: the gripper closes while the hand still descends,
CLOSE_WITHIN 1.5 cm from the grasp point (the fingers take ~10 steps to close, so the hand gets there first); the lift
starts as soon as the fingers stop; and the gripper opens with the carried object's bottom RELEASE_ABOVE 3 cm over its
rest (a short drop) instead of 1.2 cm. Traced in the default's demos (task6): the lowering decelerates from 2.6 to
~1.5 cm over the plate in 6-8 steps, often stalling on its rim, and 1-3 open steps follow before success, so at "the
bowl held just over the plate" nearly every label says "closed, nearly still", and cloned policies held the bowl
there until the time ran out (the e2e proof's candidates, scripts/e2e_finetune.py).

Degraded options (for regression-gate tests): `fumble_probability` makes whole episodes, chosen from the episode
seed, open the gripper during the lift and give up; `action_noise` adds seeded Gaussian noise to the arm dims.
The notes behind these choices are in ../shared/reference/LIBERO.md (the probe expert's measurements).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import VlaBenchError
from .identity import hash_files

KEYS = {"fumble_probability": float, "action_noise": float, "motion": str}
MOTIONS = ("gated", "funnel", "decisive")
DEFAULT_MOTION = MOTIONS[0]
REQUIRED: tuple = ()

_SCENE_SOURCE = Path(__file__).resolve().parent.parent / "envs" / "scene.py"


def validate(spec, registry) -> None:
    p = spec.options.get("fumble_probability", 0.0)
    if not 0.0 <= p <= 1.0:
        raise VlaBenchError(f"{spec.where('fumble_probability')}must lie in [0, 1], got {p}")
    s = spec.options.get("action_noise", 0.0)
    if not (s >= 0.0 and math.isfinite(s)):
        raise VlaBenchError(f"{spec.where('action_noise')}must be a finite number >= 0, got {s}")
    m = spec.options.get("motion", DEFAULT_MOTION)
    if m not in MOTIONS:
        raise VlaBenchError(f"{spec.where('motion')}must be one of {', '.join(MOTIONS)}, got {m!r}")


def identity(spec, registry) -> str:
    # the expert's behaviour is its source plus the scene facts it reads, plus its options
    files = [Path(__file__).resolve()] + ([_SCENE_SOURCE] if _SCENE_SOURCE.is_file() else []) \
        + sorted((Path(__file__).resolve().parent / "skills").glob("*.py"))
    return hash_files(files, extra={"kind": spec.kind, "options": dict(spec.options)})


def build(spec, context) -> "ScriptedExpert":
    return ScriptedExpert(fumble_probability=float(spec.options.get("fumble_probability", 0.0)),
                          action_noise=float(spec.options.get("action_noise", 0.0)),
                          motion=spec.options.get("motion", DEFAULT_MOTION))


# ---- control constants (measured on LIBERO's OSC_POSE controller; see the module docstring) -------------------
POS_GAIN = 20.0  # action 1.0 asks for 5 cm, so 20 * error asks for the whole error in one step
ROT_GAIN = 2.0  # action 1.0 asks for 0.5 rad
OPEN, CLOSE = -1.0, 1.0
Q7_LIMIT = 2.8973  # Panda joint 7 limit (rad)
MAX_OPENING = 0.08  # Panda finger opening (m)
BODY_GRASP_WIDTH = 0.07  # objects at most this wide (with margin) are grasped across the body
HOVER = 0.10  # approach height above the grasp point
FUNNEL_GRASP_XY = 0.04  # motion "funnel": horizontal error (m) from which the hand is at HOVER over the grasp point
FUNNEL_PLACE_XY = 0.03  # motion "funnel": horizontal error (m) from which the object is at the carry height
CLOSE_WITHIN = {False: 0.006, True: 0.015}  # the gripper closes this near the grasp point (m); True: "decisive"
RELEASE_ABOVE = {False: 0.012, True: 0.03}  # it opens with the object's bottom this far above its rest (m)
FINGERS_STOPPED = 0.0005  # "decisive" lifts once the finger gap changes less than this per step (m)
PLACE_CLEARANCE = 0.008  # the lowering aims the object's bottom this far above what it will rest on
CLEARANCE_CAP = 0.03  # clearances above this count as "free"; ties then go to the robot-facing side
#: the gripper as boxes in its yaw frame (x across the fingers, y along the finger axis, z up from the grip site),
#: measured from the robosuite Panda gripper's collision geoms with the fingers open
GRIPPER_BOXES = (
    ((0.0, 0.0, 0.075), (0.035, 0.104, 0.051)),  # hand
    ((0.0, 0.05, 0.018), (0.012, 0.018, 0.031)),  # finger (open)
    ((0.0, -0.05, 0.018), (0.012, 0.018, 0.031)),  # finger (open)
)
#: the reference hand orientation: pointing down, fingers along world y (the LIBERO reset pose)
R_DOWN = np.diag([1.0, -1.0, -1.0])


# ---- geometry helpers (pure functions: unit-tested) -----------------------------------------------------------
def quat_xyzw_to_mat(q) -> np.ndarray:
    x, y, z, w = (float(v) for v in q)
    n = x * x + y * y + z * z + w * w
    s = 2.0 / n if n > 0 else 0.0
    return np.array([
        [1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w)],
        [s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w)],
        [s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y)],
    ])


def rot_z(theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def axis_angle(R: np.ndarray) -> np.ndarray:
    """The rotation vector (axis * angle) of a rotation matrix, robust near 0 and pi."""
    cos = max(-1.0, min(1.0, (np.trace(R) - 1.0) / 2.0))
    angle = math.acos(cos)
    if angle < 1e-6:
        return np.zeros(3)
    v = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])
    if math.pi - angle > 1e-3:
        return v * (angle / (2.0 * math.sin(angle)))
    # near a half turn the antisymmetric part vanishes: take the axis from the symmetric part
    axis = np.sqrt(np.maximum((np.diag(R) + 1.0) / 2.0, 0.0))
    i = int(np.argmax(axis))
    axis[[j for j in range(3) if j != i]] = [(R[i, j] + R[j, i]) / (4 * axis[i]) for j in range(3) if j != i]
    axis /= np.linalg.norm(axis)
    if np.dot(axis, v) < 0:
        axis = -axis
    return axis * angle


def wrap(angle: float) -> float:
    return (angle + math.pi) % (2 * math.pi) - math.pi


def hand_yaw(R: np.ndarray) -> float:
    """Yaw of a downward hand: the angle theta with R ~= rot_z(theta) @ R_DOWN (from its finger axis)."""
    y = R[:, 1]
    return math.atan2(y[0], -y[1])


def yaw_for_axis(u) -> float:
    """One of the two yaws that put the finger axis along the horizontal direction u (the other is +pi)."""
    return wrap(math.atan2(u[1], u[0]) + math.pi / 2)


def choose_yaw(axis_yaw: float, current_yaw: float, q7: float, base_xy, eef_xy, target_xy,
               extra_turn: float = 0.0) -> float:
    """Of the two yaws axis_yaw and axis_yaw + pi, the one that leaves joint 7 farthest inside its limits.

    Turning the hand by +d about world z (pointing down) turns joint 7 by -d; turning the base by +b carries the hand
    along, which joint 7 undoes by +b to hold the hand's yaw. So the predicted q7 is q7 + b - d, with b the change
    of the target's bearing from the robot base. When both stay well inside the limits, the smaller turn wins.
    `extra_turn` is a further hand turn planned after the grasp (turning a knob): both poses must fit.
    """
    b = wrap(math.atan2(target_xy[1] - base_xy[1], target_xy[0] - base_xy[0])
             - math.atan2(eef_xy[1] - base_xy[1], eef_xy[0] - base_xy[0]))
    options = []
    for yaw in (wrap(axis_yaw), wrap(axis_yaw + math.pi)):
        d = wrap(yaw - current_yaw)
        q7_pred = q7 + b - d
        margin = min(Q7_LIMIT - abs(q7_pred), Q7_LIMIT - abs(q7_pred - extra_turn))
        options.append((yaw, d, margin))
    safe = [o for o in options if o[2] > 0.35]
    if safe:
        return min(safe, key=lambda o: abs(o[1]))[0]
    return max(options, key=lambda o: o[2])[0]


def _box_points(center, half, step=0.015) -> np.ndarray:
    axes = [np.linspace(c - h, c + h, max(2, int(math.ceil(2 * h / step)) + 1)) for c, h in zip(center, half)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)


#: sample points of the open gripper in its yaw frame, at the grasp pose and on the way down to it
GRIPPER_POINTS = np.concatenate(
    [_box_points(c, h) + np.array([0.0, 0.0, dz]) for c, h in GRIPPER_BOXES for dz in (0.0, 0.05)])


def points_to_boxes(points, centers, mats, halves) -> np.ndarray:
    """Distance from each point to the nearest of the oriented boxes (0 inside); +inf when there are no boxes."""
    points = np.asarray(points, dtype=float).reshape(-1, 3)
    if len(centers) == 0:
        return np.full(len(points), np.inf)
    diff = points[:, None, :] - np.asarray(centers)[None, :, :]
    local = np.einsum("nji,pnj->pni", np.asarray(mats), diff)
    q = np.maximum(np.abs(local) - np.asarray(halves)[None], 0.0)
    return np.sqrt((q * q).sum(-1)).min(axis=1)


def gripper_clearance(grasp_point, finger_axis, centers, mats, halves) -> float:
    """Smallest distance from the open gripper, posed at grasp_point with its fingers along finger_axis, to any box."""
    u = np.array([finger_axis[0], finger_axis[1], 0.0])
    u /= np.linalg.norm(u)
    frame = np.stack([np.cross(u, [0.0, 0.0, 1.0]), u, np.array([0.0, 0.0, 1.0])], axis=1)
    pts = np.asarray(grasp_point)[None] + GRIPPER_POINTS @ frame.T
    return float(points_to_boxes(pts, centers, mats, halves).min())


#: sample points of the hand alone (what stays outside a held object)
HAND_POINTS = _box_points(*GRIPPER_BOXES[0])


def hand_clearance(grip_point, finger_axis, centers, mats, halves) -> float:
    """Smallest distance from the hand (not the fingers), with its grip site at grip_point, to any box."""
    u = np.array([finger_axis[0], finger_axis[1], 0.0])
    u /= np.linalg.norm(u)
    frame = np.stack([np.cross(u, [0.0, 0.0, 1.0]), u, np.array([0.0, 0.0, 1.0])], axis=1)
    return float(points_to_boxes(np.asarray(grip_point)[None] + HAND_POINTS @ frame.T, centers, mats, halves).min())


def world_aabbs(centers, mats, halves):
    """Axis-aligned (lo, hi) corners of oriented boxes."""
    ext = np.einsum("nij,nj->ni", np.abs(np.asarray(mats)), np.asarray(halves))
    return np.asarray(centers) - ext, np.asarray(centers) + ext


def choose_grasp(candidates, obstacles, toward_robot, exclude=()):
    """Index of the best candidate grasp: the most gripper clearance (up to CLEARANCE_CAP), then the most aligned
    with `toward_robot` (candidates are (point, finger_axis, side_direction)). None when all are excluded."""
    best, best_score = None, -np.inf
    for k, (point, axis, side) in enumerate(candidates):
        if k in exclude:
            continue
        clear = gripper_clearance(point, axis, *obstacles)
        pref = float(np.dot(side[:2], toward_robot[:2]))
        score = min(clear, CLEARANCE_CAP) + 0.005 * pref
        if score > best_score:
            best, best_score = k, score
    return best


# ---- scene access ---------------------------------------------------------------------------------------------
class _View:
    """Convenience queries on one step's obs["scene"]."""

    def __init__(self, scene: dict):
        self.s = scene
        self.names = list(scene["names"])

    def index(self, name: str) -> int:
        return self.names.index(name)

    def boxes(self, mask):
        s = self.s
        return s["geom_pos"][mask], s["geom_mat"][mask], s["geom_half"][mask]

    def own(self, i):
        return self.s["geom_owner"] == i

    def local_extent(self, i):
        """(lo, hi) of entity i's collision geoms in its body frame."""
        c, m, h = self.boxes(self.own(i))
        R, p = self.s["mat"][i], self.s["pos"][i]
        local_c = (c - p) @ R
        ext = np.einsum("nij,nj->ni", np.abs(np.einsum("ji,njk->nik", R, m)), h)
        return (local_c - ext).min(0), (local_c + ext).max(0)

    def world_extent(self, i):
        lo, hi = world_aabbs(*self.boxes(self.own(i)))
        return lo.min(0), hi.max(0)

    def obstacles(self, exclude: int, above_z: float):
        """Boxes of every entity but `exclude`, less those wholly below above_z (the surfaces it stands on)."""
        c, m, h = self.boxes(~self.own(exclude))
        lo, hi = world_aabbs(c, m, h)
        keep = hi[:, 2] > above_z
        return c[keep], m[keep], h[keep]


# ---- the expert -----------------------------------------------------------------------------------------------
class ScriptedExpert:
    needs_images = False
    needs_privileged = True
    runs_in_worker = True  # CPU-only and picklable: each env worker runs whole episodes with its own copy

    def __init__(self, fumble_probability: float = 0.0, action_noise: float = 0.0, motion: str = DEFAULT_MOTION):
        if motion not in MOTIONS:
            raise VlaBenchError(f"motion must be one of {', '.join(MOTIONS)}, got {motion!r}")
        self.fumble_probability = float(fumble_probability)
        self.action_noise = float(action_noise)
        self.motion = motion
        self._episodes: dict[int, _Episode] = {}

    def reset(self, slot: int, seed: int) -> None:
        self._episodes[slot] = _Episode(int(seed), self.fumble_probability, self.action_noise, self.motion)

    def act(self, observations, instructions, slots) -> np.ndarray:
        actions = np.zeros((len(slots), 7))
        for k, (obs, slot) in enumerate(zip(observations, slots)):
            if "scene" not in obs:
                raise ValueError("the scripted expert needs obs['scene'] (vla_bench.envs.scene.describe_scene); "
                                 "the env side adds it when policy.needs_privileged is True")
            if slot not in self._episodes:
                self.reset(slot, 0)
            actions[k] = self._episodes[slot].act(obs)
        return actions

    def phase(self, slot: int) -> str:
        """The current phase of the slot's episode (for logs and tests)."""
        ep = self._episodes.get(slot)
        return ep.phase if ep else "none"


class _Episode:
    def __init__(self, seed: int, fumble_probability: float, action_noise: float, motion: str = DEFAULT_MOTION):
        # separate streams, so that the fumble draw and the noise do not shift each other
        self.fumble = bool(np.random.default_rng([seed, 1]).random() < fumble_probability)
        self.noise_rng = np.random.default_rng([seed, 2])
        self.action_noise = action_noise
        self.funnel = motion in ("funnel", "decisive")
        self.decisive = motion == "decisive"
        self.tasks: list | None = None
        self.gave_up = False
        self.hold: np.ndarray | None = None

    @property
    def phase(self) -> str:
        if self.gave_up:
            return "gave_up"
        if self.tasks is None:
            return "start"
        return self.tasks[0].phase if self.tasks else "done"

    def act(self, obs) -> np.ndarray:
        scene = obs["scene"]
        if self.tasks is None:
            self.tasks = plan_tasks(scene, self)
        a = None
        while self.tasks and not self.gave_up:
            a = self.tasks[0].step(obs, _View(scene))
            if a is not None:
                break
            self.tasks.pop(0)
        if a is None:  # nothing (more) to do: hold the pose with the gripper open
            eef = np.asarray(obs["robot0_eef_pos"], dtype=float)
            if self.hold is None:
                self.hold = eef + np.array([0.0, 0.0, 0.05])
            a = move_action(obs, self.hold, None, OPEN)
        if self.action_noise > 0:
            a[:6] += self.noise_rng.normal(0.0, self.action_noise, 6)
        return np.clip(a, -1.0, 1.0)


def plan_tasks(scene, episode) -> list:
    """One skill per goal predicate that the expert knows how to achieve, in the BDDL order."""
    from . import skills  # its modules import this one
    view = _View(scene)
    tasks = []
    for pred in scene["goal"]:
        if len(pred) == 3 and pred[0] in ("on", "in") and pred[1] in view.names:
            i = view.index(pred[1])
            if not scene["is_fixture"][i]:
                tasks.extend(skills.prerequisites(pred, view, episode))
                tasks.append(skills.instead_of_pick(pred, view, episode) or _PickPlace(pred[1], pred[2], pred[0],
                                                                                       episode))
        elif len(pred) == 2 and pred[0] == "turnon" and _knob_joint(scene, pred[1]) is not None:
            tasks.append(_TurnOn(pred[1], episode))
        else:
            tasks.extend(skills.skills_for(pred, view, episode))
    # switching something on is done first: the objects placed later would be in the hand's way; then the skills'
    # own order (drawers opened before, closed after what goes in them)
    tasks.sort(key=lambda t: 0 if isinstance(t, _TurnOn) else skills.order_key(t))
    return tasks


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
    """Pick `obj` and put it on / in `dest` (an entity or a region site)."""

    APPROACH_TIMEOUT = 60
    DESCEND_TIMEOUT = 25
    MAX_ATTEMPTS = 6

    def __init__(self, obj: str, dest: str, relation: str, episode: _Episode):
        self.obj, self.dest, self.relation, self.ep = obj, dest, relation, episode
        self.phase = "plan"
        self.t = 0  # steps in the current phase
        self.failed: set[int] = set()
        self.attempts = 0
        self.grasp = None  # (point in object frame, world finger axis, yaw, candidate index)
        self.width_before: float | None = None  # the finger gap one step ago, while closing ("decisive")

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
        if self.dest in v.s["sites"]:
            site = v.s["sites"][self.dest]
            xy = np.asarray(site["pos"][:2], dtype=float)
            from . import skills

            shift = skills.place_offset(self.dest, v)  # a drawer: towards its open side
            if shift is not None:
                xy = xy + shift
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
        return cands

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
            lo, _ = v.local_extent(i)
            obstacles = v.obstacles(i, p[2] + lo[2] + 0.005)
            base = np.asarray(v.s["robot_base"], dtype=float)
            toward = base - p
            toward[2] = 0.0
            toward /= max(np.linalg.norm(toward), 1e-9)
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
                    self._go("lift")
            return move_action(obs, g, yaw, CLOSE)

        if self.phase == "lift":
            if self.ep.fumble and self.t >= 3:
                self.ep.gave_up = True  # the deliberate fumble: let go and stop trying
                return move_action(obs, eef, yaw, OPEN)
            lo, _ = v.local_extent(i)
            dest_xy, _ = self._dest_xy_and_floor(v, p[2] + lo[2])
            self.carry_bottom = self._carry_bottom(v, p[:2], dest_xy)
            target = np.array([self.lift_eef[0], self.lift_eef[1],
                               eef[2] + (self.carry_bottom - (p[2] + lo[2]))])
            rise = p[2] - self.lift_from
            if rise > 0.01 and np.any(self._others_z(v) - self.others_z > 0.015):
                # another object comes up with ours (wedged under it or pinched too): put it back, try elsewhere
                self.failed.add(k)
                self._go("putback")
            elif rise > 0.03 and (p[2] + lo[2]) > self.carry_bottom - 0.03:
                self._go("transport")
            elif self.t > 8 and rise < 0.01:
                self.failed.add(k)
                self._go("regrasp")
            elif self.t > 40:
                self._go("transport")
            return move_action(obs, target, yaw, CLOSE)

        lo, _ = v.local_extent(i)
        bottom = p[2] + lo[2]
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
            if self.t >= 10:
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
