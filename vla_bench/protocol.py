"""Evaluation protocols: the one home of every number that changes a closed-loop score.

The default preset is OpenVLA's LIBERO reference protocol (run_libero_eval.py): 50 episodes per task on LIBERO's
fixed init states (episode i uses init state i), 10 wait steps with the open-gripper no-op, per-suite max steps
(the longest training demo plus margin), 256x256 cameras, env seed 0, global seed 7, success = the env's done flag.
The per-suite numbers live in the suite's record (vla_bench/suites.py); the seeds and the episode count here.
Every result row stores `Protocol.as_dict()`, and `Protocol.key()` is part of the resume identity.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

from .errors import VlaBenchError
from .suites import CLOSED_LOOP, LIBERO_SUITES, SUITES, get_suite

#: standard LIBERO suite -> max control steps after the wait steps (a view of the suites registry, which holds them;
#: a robustness variant has its base's)
MAX_STEPS = {name: SUITES[name].max_steps for name in LIBERO_SUITES}

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


def reference_protocol(suite: str, episodes: int | None = None, max_steps: int | None = None) -> Protocol:
    """OpenVLA's reference protocol for `suite`, with the user's --episodes / --max-steps overrides. A robustness
    variant keeps its base suite's max steps (its record has them): the perturbation must not change the time a task
    is given."""
    record = get_suite(suite, CLOSED_LOOP)
    if episodes is not None and episodes < 1:
        raise VlaBenchError(f"--episodes must be at least 1, got {episodes}")
    if max_steps is not None and max_steps < 1:
        raise VlaBenchError(f"--max-steps must be at least 1, got {max_steps}")
    return Protocol(
        suite=suite,
        episodes=50 if episodes is None else episodes,
        max_steps=record.max_steps if max_steps is None else max_steps,
        wait_steps=record.wait_steps,
        camera_size=record.camera_size,
    )
