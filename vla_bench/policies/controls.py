"""Negative controls: kinds `noop` (hold still, gripper open) and `random` (uniform actions). Both must fail
every LIBERO task; a suite in which they pass is measuring nothing."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .capabilities import Capabilities
from .identity import hash_files

KEYS: dict = {}
REQUIRED: tuple = ()


class NoopPolicy:
    """Zero motion, gripper -1: LIBERO's "open". In an open-loop Bridge suite the same -1 reads as "closed"
    (Bridge's gripper is 1 = open), so there it is a constant-closed control rather than a constant-open one."""

    capabilities = Capabilities(in_worker=True)  # cheap and CPU-only: each env worker runs whole episodes

    def reset(self, slot: int, seed: int) -> None:
        pass

    def act(self, observations, instructions, slots) -> np.ndarray:
        actions = np.zeros((len(slots), 7))
        actions[:, 6] = -1.0  # gripper open
        return actions


class RandomPolicy:
    """Uniform in [-1, 1] on every dim; per-slot generators seeded by the episode seed, so runs reproduce."""

    capabilities = Capabilities(in_worker=True)  # cheap and CPU-only: each env worker runs whole episodes

    def __init__(self) -> None:
        self.rngs: dict[int, np.random.Generator] = {}

    def reset(self, slot: int, seed: int) -> None:
        self.rngs[slot] = np.random.default_rng(seed)

    def act(self, observations, instructions, slots) -> np.ndarray:
        return np.stack([self.rngs[s].uniform(-1.0, 1.0, 7) for s in slots])


def identity(spec, registry) -> str:
    return hash_files([Path(__file__)], extra={"kind": spec.kind})


def build(spec, context):
    return NoopPolicy() if spec.kind == "noop" else RandomPolicy()
