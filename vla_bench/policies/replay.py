"""Positive control, kind `replay`: returns the recorded ground-truth action of the frame it is shown.

It exists to prove an open-loop suite can pass: it must pass every proxy check, so a failure points at the suite
or the data, never at a model. It is open-loop only: the proxy engine puts the frame's ground truth in
`observations[i]["ground_truth_action"]` for policies that declare `needs_privileged` (the same flag that gives
closed-loop policies privileged simulator facts); a closed-loop rollout has no ground truth, and replay says so.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import VlaBenchError
from .capabilities import Capabilities
from .identity import hash_files

KEYS: dict = {}
REQUIRED: tuple = ()

#: the observation key under which the open-loop engine passes the frame's ground-truth action
GROUND_TRUTH_KEY = "ground_truth_action"


class ReplayPolicy:
    capabilities = Capabilities(ground_truth=True)

    def reset(self, slot: int, seed: int) -> None:
        pass  # stateless: the action depends on the frame only

    def act(self, observations, instructions, slots) -> np.ndarray:
        try:
            return np.stack([np.asarray(obs[GROUND_TRUTH_KEY], dtype=np.float64) for obs in observations])
        except KeyError:
            raise VlaBenchError(
                "checkpoint kind 'replay' replays recorded actions and only runs in open-loop suites "
                "(suites/bridge_v2, the LIBERO-demos proxy suite); this suite gives it no ground truth"
            ) from None


def identity(spec, registry) -> str:
    return hash_files([Path(__file__)], extra={"kind": spec.kind})


def build(spec, context) -> ReplayPolicy:
    return ReplayPolicy()
