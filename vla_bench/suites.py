"""The suites registry: one `Suite` record per suite, the one home of everything that differs between suites.

A suite module under suites/ declares `SUITE = "<name>"`; everything that depends on which suite it is (how many
steps an episode may take, where the tasks and the data come from, what the policy sees and must answer) is read
from that name's record here, never decided from the name's spelling. A new suite is one record below and one test
module.

    closed loop  (kind CLOSED_LOOP): LIBERO rollouts in the simulator; protocol numbers and a LIBERO task source
    open loop    (kind OPEN_LOOP):   recorded episodes shown to the policy frame by frame; a data source

Conventions are declared data, checked where data meets a policy: the OpenVLA chain reads `image_key`, `flip`,
`center_crop` and `unnorm_keys`, and answers in the suite's `gripper` convention (vla_bench/gripper.py); the
open-loop metrics read the recorded actions in that convention too.
"""
from __future__ import annotations

import dataclasses

from .errors import VlaBenchError, choices
from .gripper import OPEN_IS_1, OPEN_IS_MINUS_1, check_convention

CLOSED_LOOP = "closed loop"
OPEN_LOOP = "open loop"
#: the open-loop data formats vla_bench.open_loop can read
DATA_SOURCES = ("bridge_rlds", "libero_hdf5")


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    kind: str  # CLOSED_LOOP or OPEN_LOOP
    description: str
    # ---- protocol numbers (closed loop; OpenVLA's run_libero_eval.py) ----
    max_steps: int | None = None  # control steps after the wait steps (the longest training demo plus margin)
    wait_steps: int = 10  # open-gripper no-op steps while objects settle
    camera_size: int = 256
    task_source: str | None = None  # the LIBERO benchmark whose tasks and fixed init states the suite runs
    # ---- what the policy sees and answers ----
    image_key: str = "agentview_image"  # the observation key of the frame a single-camera policy reads
    flip: bool = True  # the frame is stored upside down (LIBERO's renders): rotate it 180 degrees
    center_crop: bool = True  # OpenVLA's default center crop (the reference's LIBERO default; Bridge has none)
    gripper: str = OPEN_IS_MINUS_1  # the gripper convention of the suite's actions (vla_bench/gripper.py)
    unnorm_keys: tuple[str, ...] = ()  # norm-stats keys tried in order when a checkpoint entry sets none
    # ---- open loop ----
    data_source: str | None = None  # one of DATA_SOURCES; the path comes from checkpoints.toml [datasets.NAME]

    def __post_init__(self):
        check_convention(self.gripper)
        if self.kind == CLOSED_LOOP and (self.max_steps is None or self.task_source is None):
            raise ValueError(f"closed-loop suite {self.name} needs max_steps and task_source")
        if self.kind == OPEN_LOOP and self.data_source not in DATA_SOURCES:
            raise ValueError(f"open-loop suite {self.name}: data_source must be one of {choices(DATA_SOURCES)}")

    @property
    def closed_loop(self) -> bool:
        return self.kind == CLOSED_LOOP


def _libero(name: str, max_steps: int, description: str) -> Suite:
    """A closed-loop LIBERO suite: raw renders (upside down), LIBERO's gripper, the reference's unnorm-key rule
    (the suite's own statistics, then those of its no-op-filtered version)."""
    return Suite(name, CLOSED_LOOP, description, max_steps=max_steps, task_source=name,
                 unnorm_keys=(name, f"{name}_no_noops"))


#: every suite, by name; max steps: OpenVLA's (longest demo in brackets)
SUITES: dict[str, Suite] = {s.name: s for s in (
    _libero("libero_spatial", 220, "LIBERO-Spatial, 10 tasks (longest demo 193 steps)"),
    _libero("libero_object", 280, "LIBERO-Object, 10 tasks (longest demo 254 steps)"),
    _libero("libero_goal", 300, "LIBERO-Goal, 10 tasks (longest demo 270 steps)"),
    _libero("libero_10", 520, "LIBERO-10 (Long), 10 tasks (longest demo 505 steps)"),
    _libero("libero_90", 400, "LIBERO-90, 90 tasks (longest demo 373 steps)"),
    Suite("bridge_v2", OPEN_LOOP, "Bridge V2 episodes in the released RLDS layout, OpenVLA's ground truth",
          image_key="image", flip=False, center_crop=False, gripper=OPEN_IS_1, unnorm_keys=("bridge_orig",),
          data_source="bridge_rlds"),
    # frames are raw renders (upside down, as LIBERO's files store them), so the same flip as in closed loop;
    # actions in LIBERO's units, whose statistics no published checkpoint names: the entry sets unnorm_key
    Suite("libero_demos", OPEN_LOOP, "LIBERO HDF5 demonstrations (released, or the scripted expert's)",
          image_key="image", data_source="libero_hdf5"),
)}


def suite_names(kind: str | None = None) -> tuple[str, ...]:
    return tuple(name for name, s in SUITES.items() if kind is None or s.kind == kind)


def get_suite(name: str, kind: str | None = None) -> Suite:
    """The record of `name`; the one place an unknown suite (or one of the wrong kind) is refused."""
    suite = SUITES.get(name)
    if suite is None or (kind is not None and suite.kind != kind):
        what = f"{kind} suite" if kind else "suite"
        raise VlaBenchError(f"unknown {what} {name!r}; valid suites: {choices(suite_names(kind))}")
    return suite
