"""What crosses the wire: LIBERO observations -> a server's observation dict, and a server's actions -> LIBERO's.

Observation mapping (`ObservationMapping`): which key carries the third-person frame, the wrist frame, the
proprioceptive state and the instruction; the frame's size and resize rule; whether frames go upright. Keys with
dots name nested maps ("images.agentview" is obs["images"]["agentview"]). Presets, as each project's own LIBERO
client sends it:

- "openpi-libero" (openpi examples/libero/main.py): "observation/image" and "observation/wrist_image", both
  turned upright (LIBERO renders upside down) and resized with padding to 224x224; "observation/state" =
  eef position (3) + eef axis-angle (3) + gripper joint positions (2); "prompt".
- "vla-eval-libero" (vla-eval's LIBERO benchmark, defaults): {"images": {"agentview": frame}} upright and padded
  to 256x256 (the render size, so unchanged), "task_description"; no wrist frame and no state unless asked
  (wrist_key = "images.wrist", state_key = "states").

Action post-processing (`ActionMapping`): the server's gripper convention, sign binarization, and
unnormalization (BOUNDS_Q99, vla_bench/openvla/normalization.py) for servers that answer normalized actions.

`vla-bench serve` reads the same mapping backwards (`policy_observation`): the frame turned back to the render's
orientation under the env's key, so a served checkpoint sees what it would see in-process.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from ..errors import VlaBenchError, choices
from ..gripper import SERVER_CONVENTIONS, server_to_libero

#: the state layouts a mapping can send: name -> (size, description)
STATE_LAYOUTS = {
    "eef_pos_axisangle_gripper": (8, "eef position (3), eef axis-angle (3), gripper joint positions (2)"),
    "eef_pos_quat_gripper": (9, "eef position (3), eef quaternion xyzw (4), gripper joint positions (2)"),
}
RESIZE_RULES = ("pad", "stretch")
#: LIBERO's observation keys (robosuite names) that the mapping reads
ENV_IMAGE, ENV_WRIST = "agentview_image", "robot0_eye_in_hand_image"
WRIST_CAMERA = "robot0_eye_in_hand"
#: where an env worker leaves the wire observation it prepared (tagged with the mapping that made it)
PREPARED = "vla_bench_wire_observation"


@dataclasses.dataclass(frozen=True)
class ObservationMapping:
    image_key: str
    prompt_key: str
    wrist_key: str | None = None
    state_key: str | None = None
    state_layout: str = "eef_pos_axisangle_gripper"
    image_size: int | None = None  # None: frames go at the render size
    resize: str = "pad"
    upright: bool = True  # turn LIBERO's upside-down renders the right way up before sending

    def cameras(self) -> tuple[str, ...]:
        return ("agentview", WRIST_CAMERA) if self.wrist_key else ("agentview",)

    def wire_observation(self, obs: Mapping[str, Any], instruction: str | None) -> dict:
        """One env observation + instruction -> the dict the server expects (the frames prepared by an env
        worker when it ran this mapping as its observation transform; the instruction left out when None)."""
        prepared = obs.get(PREPARED)
        if prepared is not None and prepared[0] == self:
            out = _copy_maps(prepared[1])
        else:
            out = {}
            _put(out, self.image_key, self._frame(obs[ENV_IMAGE]))
            if self.wrist_key:
                _put(out, self.wrist_key, self._frame(obs[ENV_WRIST]))
            if self.state_key:
                _put(out, self.state_key, proprio_state(obs, self.state_layout))
        if instruction is not None:
            _put(out, self.prompt_key, instruction)
        return out

    def __call__(self, obs: dict) -> dict:
        """As an env worker's observation transform (policies/base.py): flips and resizes run in the workers, in
        parallel, instead of one after another in the policy's process (~3 ms a frame on a busy CPU core)."""
        obs[PREPARED] = (self, self.wire_observation(obs, None))
        return obs

    def _frame(self, frame: np.ndarray) -> np.ndarray:
        frame = np.asarray(frame)
        if self.upright:
            frame = frame[::-1, ::-1]
        if self.image_size is not None:
            frame = resize_frame(frame, self.image_size, self.resize)
        return np.ascontiguousarray(frame, dtype=np.uint8)

    def policy_observation(self, wire: Mapping[str, Any], where: str = "") -> tuple[dict, str]:
        """A received observation -> (env-style observation, instruction), for a served policy."""
        obs = {ENV_IMAGE: self._received_frame(wire, self.image_key, where)}
        if self.wrist_key and _has(wire, self.wrist_key):
            obs[ENV_WRIST] = self._received_frame(wire, self.wrist_key, where)
        instruction = _get(wire, self.prompt_key, where)
        if not isinstance(instruction, str):
            raise ValueError(f"{where}observation key {self.prompt_key!r}: expected the instruction (str), "
                             f"received {type(instruction).__name__}")
        return obs, instruction

    def _received_frame(self, wire, key: str, where: str) -> np.ndarray:
        frame = _get(wire, key, where)
        if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            shape = getattr(frame, "shape", None)
            dtype = getattr(frame, "dtype", type(frame).__name__)
            raise ValueError(f"{where}observation key {key!r}: expected an HxWx3 uint8 frame, received "
                             f"shape {shape} dtype {dtype}")
        return np.ascontiguousarray(frame[::-1, ::-1]) if self.upright else frame


PRESETS = {
    "openpi-libero": ObservationMapping(image_key="observation/image", wrist_key="observation/wrist_image",
                                        state_key="observation/state", prompt_key="prompt", image_size=224),
    "vla-eval-libero": ObservationMapping(image_key="images.agentview", prompt_key="task_description",
                                          image_size=256),
}
#: the preset an entry gets when it names none
DEFAULT_PRESET = {"openpi": "openpi-libero", "vla-eval": "vla-eval-libero"}
#: entry keys that override one field of the preset
MAPPING_KEYS = {"image_key": str, "wrist_key": str, "state_key": str, "state_layout": str, "prompt_key": str,
                "image_size": int, "resize": str, "upright": bool}


def observation_mapping(protocol: str, options: Mapping[str, Any], where: str = "") -> ObservationMapping:
    """The preset named by `observation` (default: the protocol's LIBERO preset), with the entry's overrides
    ("" for wrist_key / state_key turns that part off, 0 for image_size sends the render size)."""
    name = options.get("observation", DEFAULT_PRESET[protocol])
    if name not in PRESETS:
        raise VlaBenchError(f"{where}observation: unknown preset {name!r}; valid: {choices(PRESETS)}")
    fields = {k: v for k, v in options.items() if k in MAPPING_KEYS}
    for key in ("wrist_key", "state_key"):
        if fields.get(key) == "":
            fields[key] = None
    if fields.get("image_size") == 0:
        fields["image_size"] = None
    mapping = dataclasses.replace(PRESETS[name], **fields)
    if mapping.state_layout not in STATE_LAYOUTS:
        raise VlaBenchError(f"{where}state_layout: unknown layout {mapping.state_layout!r}; valid: "
                            f"{choices(STATE_LAYOUTS)}")
    if mapping.resize not in RESIZE_RULES:
        raise VlaBenchError(f"{where}resize: unknown rule {mapping.resize!r}; valid: {choices(RESIZE_RULES)}")
    if mapping.image_size is not None and not 8 <= mapping.image_size <= 4096:
        raise VlaBenchError(f"{where}image_size: expected 8..4096 pixels (or 0: the render size), "
                            f"got {mapping.image_size}")
    return mapping


def resize_frame(frame: np.ndarray, size: int, rule: str = "pad") -> np.ndarray:
    """HxWx3 uint8 -> size x size: "pad" keeps the aspect ratio and pads with black (as openpi's and vla-eval's
    LIBERO clients do), "stretch" ignores it. Bilinear (Pillow), as both clients; a frame already of that size is
    returned unchanged."""
    h, w = frame.shape[:2]
    if (h, w) == (size, size):
        return frame
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(frame))
    if rule == "stretch":
        return np.asarray(image.resize((size, size), resample=Image.Resampling.BILINEAR))
    scale = max(w / size, h / size)
    new_w, new_h = int(w / scale), int(h / scale)
    canvas = Image.new(image.mode, (size, size), 0)
    canvas.paste(image.resize((new_w, new_h), resample=Image.Resampling.BILINEAR),
                 ((size - new_w) // 2, (size - new_h) // 2))
    return np.asarray(canvas)


def quat_to_axis_angle(quat_xyzw) -> np.ndarray:
    """A unit quaternion (x, y, z, w: robosuite's order) -> axis * angle, angle in [0, 2 pi]."""
    q = np.asarray(quat_xyzw, dtype=np.float64)
    w = min(1.0, max(-1.0, float(q[3])))
    sin_half = math.sqrt(1.0 - w * w)
    if sin_half < 1e-10:  # no rotation: any axis, zero angle
        return np.zeros(3)
    return q[:3] * (2.0 * math.acos(w) / sin_half)


def proprio_state(obs: Mapping[str, Any], layout: str) -> np.ndarray:
    pos, quat = np.asarray(obs["robot0_eef_pos"]), np.asarray(obs["robot0_eef_quat"])
    rot = quat_to_axis_angle(quat) if layout == "eef_pos_axisangle_gripper" else quat
    return np.concatenate([pos, rot, np.asarray(obs["robot0_gripper_qpos"])]).astype(np.float32)


def _copy_maps(value):
    """A copy of nested dicts that shares their arrays (the prompt is added to the copy, never to the original)."""
    return {k: _copy_maps(v) for k, v in value.items()} if isinstance(value, dict) else value


def _put(out: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    for part in parents:
        out = out.setdefault(part, {})
    out[last] = value


def _has(wire, key: str) -> bool:
    node = wire
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _get(wire, key: str, where: str = ""):
    node = wire
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            present = sorted(map(str, node)) if isinstance(node, Mapping) else []
            raise ValueError(f"{where}observation: expected key {key!r}, received keys {present}")
        node = node[part]
    return node


# ---- actions ------------------------------------------------------------------------------------------------------
#: gripper conventions a server may answer in (their home: vla_bench/gripper.py)
GRIPPERS = SERVER_CONVENTIONS


@dataclasses.dataclass(frozen=True)
class ActionMapping:
    gripper: str = "libero"
    binarize_gripper: bool = False  # sign of the gripper command -> exactly -1 / +1 (vla-eval's LIBERO does it)
    stats: Mapping[str, np.ndarray] | None = None  # q01 / q99 / mask: the server's actions come normalized

    def __call__(self, actions: np.ndarray) -> np.ndarray:
        """(..., 7) actions as the server sent them -> LIBERO's."""
        out = np.array(actions, dtype=np.float64, copy=True)
        if self.stats is not None:
            from ..openvla.normalization import unnormalize

            out = unnormalize(out, self.stats["q01"], self.stats["q99"], self.stats["mask"])
        out = server_to_libero(out, self.gripper)
        if self.binarize_gripper:
            out[..., -1] = np.where(out[..., -1] < 0, -1.0, 1.0)
        return out
