"""The scripted expert's geometry: rotations and axis-angle, the hand's yaw and the choice between its two equivalent
yaws, the gripper modelled as boxes and its clearance from obstacles, and the choice among candidate grasps.

Pure NumPy functions of poses and boxes (unit-tested); why the expert grasps and turns this way is in scripted.py's
docstring.
"""
from __future__ import annotations

import math

import numpy as np

# ---- gripper and arm facts (the robosuite Panda) ------------------------------------------------------------------
Q7_LIMIT = 2.8973  # Panda joint 7 limit (rad)
MAX_OPENING = 0.08  # Panda finger opening (m)
BODY_GRASP_WIDTH = 0.07  # objects at most this wide (with margin) are grasped across the body
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


#: directions and distances (m) tried, shortest first, when a held object must leave from under an overhang
ESCAPE_DIRECTIONS = 32
ESCAPE_MAX = 0.20
ESCAPE_STEP = 0.01
ESCAPE_MARGIN = 0.01  # from what is above; from what stands beside, none: the boxes of round things already have it


def overlap_xy(lo, hi, box_lo, box_hi, margin=0.0) -> np.ndarray:
    """Which boxes overlap the xy rectangle [lo, hi] grown by margin."""
    return ((box_lo[:, 0] < hi[0] + margin) & (box_hi[:, 0] > lo[0] - margin)
            & (box_lo[:, 1] < hi[1] + margin) & (box_hi[:, 1] > lo[1] - margin))


def escape_shift(footprints, above_lo, above_hi, beside_lo, beside_hi, beside_footprints=None, path=True):
    """The shortest horizontal shift (world xy, m) that takes every footprint (xy rectangles (lo, hi): the held object,
    the hand) out from under the boxes `above` (AABBs over the object: an open drawer, a shelf), without running a
    footprint (or each of `beside_footprints`, when given) into the boxes `beside` (AABBs at the object's own height);
    a zero shift when nothing is above, None when no shift up to ESCAPE_MAX frees it. `path`: the way there, sampled
    at its middle, must be clear too (False: only where it ends, for an object carried over what is beside it).
    Lifting straight up under an overhang jams the object against it and the grip slips (LIBERO-Goal task4: the
    opened top drawer reaches over the bowl)."""
    above_lo, above_hi = np.asarray(above_lo).reshape(-1, 3), np.asarray(above_hi).reshape(-1, 3)
    beside_lo, beside_hi = np.asarray(beside_lo).reshape(-1, 3), np.asarray(beside_hi).reshape(-1, 3)

    def free(shift, lo_boxes, hi_boxes, rectangles=footprints, margin=ESCAPE_MARGIN):
        return not any(overlap_xy(lo + shift, hi + shift, lo_boxes, hi_boxes, margin).any() for lo, hi in rectangles)

    beside_footprints = footprints if beside_footprints is None else beside_footprints

    zero = np.zeros(2)
    if free(zero, above_lo, above_hi):
        return zero
    angles = 2 * math.pi * np.arange(ESCAPE_DIRECTIONS) / ESCAPE_DIRECTIONS
    directions = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    for distance in np.arange(ESCAPE_STEP, ESCAPE_MAX + 1e-9, ESCAPE_STEP):
        for d in directions:
            shift = d * distance
            # the whole way must stay clear of what stands beside the object, not only the end
            if free(shift, above_lo, above_hi) and all(free(shift * f, beside_lo, beside_hi, beside_footprints, 0.0)
                                                       for f in ((0.5, 1.0) if path else (1.0,))):
                return shift
    return None


def hand_footprint(grip_xy, finger_axis):
    """The xy rectangle (lo, hi) covered by the hand (not the fingers) with its grip site over grip_xy."""
    _, (hx, hy, _) = GRIPPER_BOXES[0]  # the hand's box is centred on the grip site in xy
    u = np.array([finger_axis[0], finger_axis[1]], dtype=float)
    u /= np.linalg.norm(u)
    ext = np.abs(u) * hy + np.abs(np.array([u[1], -u[0]])) * hx
    return np.asarray(grip_xy)[:2] - ext, np.asarray(grip_xy)[:2] + ext
