"""The Policy protocol: the one seam between models and environments.

A policy is batched over environment *slots*. The rollout engine runs several environments at once; each slot is one
environment, and a new episode in a slot starts with `reset(slot, seed)`. `act` receives the observations of the slots
that are still running (in the order of `slots`) and returns one 7-dim action per slot, in the environment's action
convention (LIBERO: OSC_POSE deltas in [-1, 1], gripper -1 open / +1 close). Model-specific pre- and post-processing
(image flips, resizing, unnormalization, gripper conventions) happens inside the policy, so the environment side
never needs to know the model family.
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class Policy(Protocol):
    #: camera observations are rendered only when True (rendering costs ~0.2 s/step/camera on a CPU)
    needs_images: bool
    #: privileged simulator facts (obs["scene"]: collision geoms, robot base, goal) are added only when True
    needs_privileged: bool
    # Optional: `runs_in_worker = True` says the policy is cheap, CPU-only and picklable, so each env worker gets
    # its own copy and runs whole episodes (no lockstep batching); models on a GPU leave it unset.
    # Optional: `observation_transform`, a picklable callable obs -> obs that every env worker applies to its
    # observations before sending them (per-frame preprocessing then runs in parallel across workers, not serially
    # in the policy's process). It must not import timm/torchvision (they segfault after robosuite), and the
    # policy must still accept untransformed observations (open-loop suites read frames from files).

    def reset(self, slot: int, seed: int) -> None:
        """A new episode starts in env slot `slot`; `seed` makes any randomness of the policy reproducible."""

    def act(self, observations: Sequence[dict], instructions: Sequence[str], slots: Sequence[int]) -> np.ndarray:
        """Return a (len(slots), 7) float array of actions for the given slots."""


class SlotErrors(Exception):
    """Raised by `act` when the actions of some slots could not be had (a remote server died or answered garbage):
    each of those slots' episodes ends as an error (counted apart from failures, retried by the next run), and the
    other slots step on with the actions computed for them.

    errors: {slot: message naming what went wrong}; actions: {slot: (7,) action} for the slots that have one."""

    def __init__(self, errors: dict[int, str], actions: dict[int, np.ndarray]):
        super().__init__("; ".join(f"slot {s}: {m}" for s, m in sorted(errors.items())))
        self.errors = dict(errors)
        self.actions = dict(actions)
