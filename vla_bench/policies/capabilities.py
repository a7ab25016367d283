"""What a policy needs from the environment and how it acts: one typed record per policy, the one home of the defaults.

Every policy carries `capabilities` (a Capabilities). The engine, the open-loop suites and `vla-bench collect` read
only this record; nothing probes policies attribute by attribute. `check_policy` checks the record when the policy
is built (build_policy calls it), so a wrong value is named there, with the kind, not as a crash mid-run.

Policies written against the older protocol (class attributes `needs_images`, `needs_privileged`, `runs_in_worker`,
`observation_transform`) still work: `capabilities_of` translates those attributes, here and nowhere else.
"""
from __future__ import annotations

import dataclasses
import pickle
from typing import Callable

from ..errors import VlaBenchError, choices

#: LIBERO's cameras (robosuite names); the closed-loop engine renders only those a policy (or a video) needs
LIBERO_CAMERAS = ("agentview", "robot0_eye_in_hand")
#: LIBERO's OSC_POSE action: 3 translation deltas, 3 rotation deltas, 1 gripper command
ACTION_SIZE = 7


@dataclasses.dataclass(frozen=True)
class Capabilities:
    #: camera frames in the observations (rendering costs ~0.2 s per step and camera on a CPU)
    images: bool = False
    #: which cameras, when `images`
    cameras: tuple[str, ...] = ("agentview",)
    #: privileged simulator facts in obs["scene"] (collision geoms, robot base, goal): the scripted expert's input
    privileged: bool = False
    #: open loop: the dataset's own action in obs["ground_truth_action"] (the `replay` control)
    ground_truth: bool = False
    #: cheap, CPU-only and picklable: every env worker runs whole episodes with its own copy (no lockstep batching)
    in_worker: bool = False
    #: a picklable obs -> obs callable that every env worker applies before sending observations (per-frame
    #: preprocessing runs in parallel across workers). It must not import timm/torchvision (they segfault after
    #: robosuite), and the policy must still accept untransformed observations (open loop reads frames from files)
    frame_transform: Callable | None = None
    #: the length of one action
    action_size: int = ACTION_SIZE
    #: actions executed per model call (an action chunk, or action_repeat); 1: the model is asked every step
    chunk_length: int = 1

    def check(self, where: str = "") -> "Capabilities":
        """The record itself, or a VlaBenchError naming the wrong field and its valid values."""
        for name in ("images", "privileged", "ground_truth", "in_worker"):
            if not isinstance(getattr(self, name), bool):
                raise VlaBenchError(f"{where}capabilities.{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.cameras, str) or not all(isinstance(c, str) for c in self.cameras):
            raise VlaBenchError(f"{where}capabilities.cameras must be a tuple of camera names, got {self.cameras!r}")
        unknown = [c for c in self.cameras if c not in LIBERO_CAMERAS]
        if unknown:
            raise VlaBenchError(f"{where}capabilities.cameras: unknown camera(s) {choices(unknown)}; "
                                f"valid: {choices(LIBERO_CAMERAS)}")
        if self.images and not self.cameras:
            raise VlaBenchError(f"{where}capabilities.images is True but no camera is named")
        if self.frame_transform is not None and not callable(self.frame_transform):
            raise VlaBenchError(f"{where}capabilities.frame_transform must be callable (obs -> obs) or None")
        for name in ("action_size", "chunk_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise VlaBenchError(f"{where}capabilities.{name} must be an integer >= 1, got {value!r}")
        return self

    @property
    def rendered_cameras(self) -> tuple[str, ...]:
        """The cameras the simulator must render for this policy (none for a state-only policy)."""
        return tuple(self.cameras) if self.images else ()

    def cameras_to_render(self, video: bool) -> tuple[str, ...]:
        """The policy's cameras, plus the agentview when episodes are recorded as videos (~0.2 s per step and
        camera on a CPU: nothing else is rendered)."""
        cameras = self.rendered_cameras
        return cameras + ("agentview",) if video and "agentview" not in cameras else cameras


def _legacy(policy) -> Capabilities:
    """The record of a policy written against the older attribute protocol (see the module docstring)."""
    transform = getattr(policy, "observation_transform", None)
    return Capabilities(images=bool(getattr(policy, "needs_images", False)),
                        privileged=bool(getattr(policy, "needs_privileged", False)),
                        ground_truth=bool(getattr(policy, "needs_privileged", False)),
                        in_worker=bool(getattr(policy, "runs_in_worker", False)),
                        frame_transform=transform)


def capabilities_of(policy, where: str = "") -> Capabilities:
    """The policy's capability record, its fields checked. `where` prefixes errors (e.g. the checkpoints.toml
    entry). Cheap: callers read it where they need it."""
    record = getattr(policy, "capabilities", None)
    if record is None:
        record = _legacy(policy)
    elif not isinstance(record, Capabilities):
        raise VlaBenchError(f"{where}{type(policy).__name__}.capabilities must be a vla_bench Capabilities "
                            f"record, got {type(record).__name__}")
    return record.check(where)


def check_policy(policy, where: str = "") -> Capabilities:
    """capabilities_of, and for an in-worker policy that it can be pickled to the workers: what build_policy
    checks once per policy (pickling a policy costs more than reading its record)."""
    record = capabilities_of(policy, where)
    if record.in_worker:  # every worker gets a copy: refuse a policy that cannot travel, before any worker starts
        try:
            pickle.dumps(policy)
        except Exception as e:  # noqa: BLE001 - pickling errors come in many types; all mean the same here
            raise VlaBenchError(f"{where}capabilities.in_worker is True but {type(policy).__name__} cannot be "
                                f"pickled to the env workers ({type(e).__name__}: {e})") from None
    return record
