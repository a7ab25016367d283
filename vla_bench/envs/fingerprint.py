"""Scene fingerprints: where every object of a LIBERO scene sits once it has settled, on the reference stack.

A LIBERO init state places the objects a few centimetres above their resting places; the physics of the reset and
the protocol's wait steps seat them. The settled scene therefore depends on the simulator: from mujoco 3.4 on,
libero_spatial task6's bowl no longer seats on the ramekin (it ends 6 cm off its centre), and a policy is then
scored on a scene it was never trained on. A fingerprint is the settled pose (position and orientation) of every
object and fixture body, for every suite, task and official init state, measured after `LiberoTaskEnv.reset`
(seeded reset, init state, wait steps) on the reference stack (mujoco 2.3.7, robosuite 1.4.0). The package ships
them (envs/scene_fingerprints.npz, made by tools/fixtures/make_scene_fingerprints.py); `vla-bench doctor` compares
the running stack against all of them, and every evaluation episode checks its own scene (a handful of body poses read
after the reset, no extra simulation) so that every result row carries the verdict.

Also here: a few reference agentview frames per suite (downscaled), so that a renderer that draws another floor or
a moved camera is caught too.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import numpy as np

#: the package's fingerprints of the reference stack
FINGERPRINTS = Path(__file__).resolve().parent / "scene_fingerprints.npz"
#: another fingerprint file for every check of this process and its simulator workers (tests, a custom stack)
FINGERPRINTS_ENV = "VLA_BENCH_FINGERPRINTS"
#: a settled object further than this from its reference pose is a different scene
POSITION_TOLERANCE_M = 0.005
ANGLE_TOLERANCE_DEG = 5.0
#: stored quantization: positions in units of 0.1 mm, quaternion components times QUAT_SCALE
_POSITION_UNIT = 1e-4
_QUAT_SCALE = 10000
#: reference frames are stored downscaled by this factor (block means); their mean absolute difference in levels
#: must stay under RENDER_TOLERANCE (a darker floor or a moved camera shifts it by far more)
RENDER_DOWNSCALE = 4
RENDER_TOLERANCE = 4.0
#: the protocol numbers a settled scene depends on; a protocol that differs in one of them is not checked
SCENE_PROTOCOL_FIELDS = ("wait_steps", "env_seed", "global_seed")


def body_poses(env) -> tuple[list[str], np.ndarray]:
    """(names, poses [n, 7] = xyz + wxyz quaternion) of the root body of every object and fixture of a LIBERO env
    (the robosuite env under LiberoTaskEnv.env), in a fixed order."""
    inner = env.env if hasattr(env, "env") else env
    sim = inner.sim
    names, poses = [], []
    for group in (inner.objects_dict, inner.fixtures_dict):
        for name in sorted(group):
            body = sim.model.body_name2id(group[name].root_body)
            names.append(name)
            poses.append(np.concatenate([sim.data.body_xpos[body], sim.data.body_xquat[body]]))
    return names, np.asarray(poses, dtype=np.float64).reshape(-1, 7)


def quantize(poses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    quats = poses[..., 3:] * np.sign(poses[..., 3:4] + 1e-12)  # q and -q are one rotation: keep w >= 0
    return (np.round(poses[..., :3] / _POSITION_UNIT).astype(np.int32),
            np.round(quats * _QUAT_SCALE).astype(np.int16))


def dequantize(positions: np.ndarray, quats: np.ndarray) -> np.ndarray:
    return np.concatenate([positions * _POSITION_UNIT, quats.astype(np.float64) / _QUAT_SCALE], axis=-1)


def pose_differences(reference: np.ndarray, measured: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per body: (distance in m, rotation angle in degrees) between two [n, 7] pose arrays."""
    distance = np.linalg.norm(reference[..., :3] - measured[..., :3], axis=-1)
    q1 = reference[..., 3:] / np.linalg.norm(reference[..., 3:], axis=-1, keepdims=True)
    q2 = measured[..., 3:] / np.linalg.norm(measured[..., 3:], axis=-1, keepdims=True)
    dot = np.clip(np.abs(np.sum(q1 * q2, axis=-1)), 0.0, 1.0)
    return distance, np.degrees(2.0 * np.arccos(dot))


@dataclasses.dataclass(frozen=True)
class SceneCheck:
    """The verdict on one settled scene: 'match', 'mismatch' or 'unchecked', with what differs."""
    status: str
    detail: str = ""
    worst_distance_m: float = 0.0
    worst_angle_deg: float = 0.0

    def __str__(self) -> str:
        return self.status + (f": {self.detail}" if self.detail else "")

    @property
    def ok(self) -> bool:
        return self.status != "mismatch"


class Fingerprints:
    """The reference poses of one fingerprint file, looked up by (suite, task index, init index)."""

    def __init__(self, path: str | Path = FINGERPRINTS):
        self.path = Path(path)
        with np.load(self.path, allow_pickle=False) as data:
            self.arrays = {key: data[key] for key in data.files}
        self.meta = json.loads(str(self.arrays.pop("meta")))

    def covers(self, protocol) -> str | None:
        """None when this file's scenes were made under `protocol`'s settings, else why they were not."""
        made = self.meta["protocol"]
        for field in SCENE_PROTOCOL_FIELDS:
            if getattr(protocol, field) != made[field]:
                return f"fingerprints were made with {field} = {made[field]}, this run uses {getattr(protocol, field)}"
        if f"{protocol.suite}/0/positions" not in self.arrays:
            return f"no fingerprints for suite {protocol.suite}"
        return None

    def reference(self, suite: str, task_index: int, init_index: int) -> tuple[list[str], np.ndarray] | None:
        key = f"{suite}/{task_index}"
        if f"{key}/positions" not in self.arrays or init_index >= len(self.arrays[f"{key}/positions"]):
            return None
        names = [str(n) for n in self.arrays[f"{key}/names"]]
        return names, dequantize(self.arrays[f"{key}/positions"][init_index], self.arrays[f"{key}/quats"][init_index])

    def check(self, suite: str, task_index: int, init_index: int, names: list[str], poses: np.ndarray,
              position_tolerance: float = POSITION_TOLERANCE_M, angle_tolerance: float = ANGLE_TOLERANCE_DEG,
              ) -> SceneCheck:
        ref = self.reference(suite, task_index, init_index)
        if ref is None:
            return SceneCheck("unchecked", f"no fingerprint for {suite} task{task_index + 1} init state {init_index}")
        ref_names, ref_poses = ref
        if ref_names != list(names):
            return SceneCheck("mismatch", f"objects differ: reference {ref_names}, this scene {list(names)}")
        distance, angle = pose_differences(ref_poses, poses)
        bad = [(names[k], distance[k], angle[k]) for k in range(len(names))
               if distance[k] > position_tolerance or angle[k] > angle_tolerance]
        worst = (float(distance.max(initial=0.0)), float(angle.max(initial=0.0)))
        if not bad:
            return SceneCheck("match", "", *worst)
        detail = ", ".join(f"{n} {d * 100:.1f} cm / {a:.1f} deg off" for n, d, a in bad)
        return SceneCheck("mismatch", detail, *worst)

    def frame(self, suite: str) -> np.ndarray | None:
        return self.arrays.get(f"render/{suite}")


def fingerprints_path() -> Path:
    return Path(os.environ.get(FINGERPRINTS_ENV) or FINGERPRINTS)


@functools.lru_cache(maxsize=4)
def _load(path: Path) -> Fingerprints | None:
    return Fingerprints(path) if path.is_file() else None


def load() -> Fingerprints | None:
    """The fingerprints in force ($VLA_BENCH_FINGERPRINTS or the package's), or None where the file is missing."""
    return _load(fingerprints_path())


def downscale(frame: np.ndarray, factor: int = RENDER_DOWNSCALE) -> np.ndarray:
    """HxWx3 uint8 -> (H/f)x(W/f)x3 float32 block means: tiny, and blind to a pixel of anti-aliasing."""
    h, w, c = frame.shape
    return frame[: h - h % factor, : w - w % factor].reshape(h // factor, factor, w // factor, factor, c) \
        .mean(axis=(1, 3), dtype=np.float64).astype(np.float32)


def render_difference(reference: np.ndarray, frame: np.ndarray) -> float:
    """Mean absolute difference in levels between a stored downscaled frame and a new full-size render."""
    return float(np.abs(reference.astype(np.float64) - downscale(frame)).mean())


def scene_check(env, protocol, task_index: int, init_index: int) -> SceneCheck:
    """The verdict on the scene `env` (a LiberoTaskEnv) holds right after reset(init_index)."""
    prints = load()
    if prints is None:
        return SceneCheck("unchecked", f"{fingerprints_path()} is missing")
    reason = prints.covers(protocol)
    if reason is not None:
        return SceneCheck("unchecked", reason)
    names, poses = body_poses(env.env)
    return prints.check(protocol.suite, task_index, init_index, names, poses)


def settle_task(suite: str, task_index: int, init_indices) -> tuple[list[str], np.ndarray]:
    """Reset one task's env to each init state as an evaluation episode does and return (names, poses
    [len(init_indices), n, 7]). Runs the simulator: call it in a worker process (see envs/libero.py)."""
    from ..protocol import reference_protocol
    from .libero import LiberoTaskEnv

    protocol = reference_protocol(suite)
    env = LiberoTaskEnv(protocol, task_index)
    try:
        names, poses = [], []
        for init_index in init_indices:
            env.reset(init_index, protocol.episode_seed(task_index, init_index))
            names, pose = body_poses(env.env)
            poses.append(pose)
        return names, np.asarray(poses).reshape(len(poses), len(names), 7)
    finally:
        env.close()


def render_reference(suite: str, task_index: int = 0) -> tuple[np.ndarray, str]:
    """(agentview frame of `task_index`, init state 0, after the wait steps; the renderer's name)."""
    from ..protocol import reference_protocol
    from .libero import LiberoTaskEnv
    from .rendering import renderer_name

    protocol = reference_protocol(suite)
    env = LiberoTaskEnv(protocol, task_index, cameras=("agentview",))
    try:
        obs = env.reset(0, protocol.episode_seed(task_index, 0))
        return np.asarray(obs["agentview_image"]), renderer_name(env.backend)
    finally:
        env.close()
