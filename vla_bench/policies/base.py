"""The Policy protocol: the one seam between models and environments.

A policy is batched over environment *slots*. The engine (vla_bench/engine/) runs several environments at once; each slot is one
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
    # What the policy needs from the environment (images and which cameras, privileged state, ground truth), whether
    # it runs inside the env workers, its frame transform, action size and chunk length: the attribute
    # `capabilities`, a policies.capabilities.Capabilities record, read through `capabilities_of` (one home of the
    # defaults; the older attributes needs_images / needs_privileged / runs_in_worker / observation_transform are
    # translated there).

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


@runtime_checkable
class ReportsPhase(Protocol):
    """A policy that knows which phase of its plan each slot's episode is in (the scripted expert): a failed
    episode's summary names the phase it stopped in (engine/trace.py: `last_phase`)."""

    def phase(self, slot: int) -> str:
        """The phase of the slot's current (or, until its next reset, last) episode."""
