"""BOUNDS_Q99 action normalization and its inverse: the one home of how norm stats map actions to [-1, 1].

Norm stats are OpenVLA's `dataset_statistics.json` / `config.json["norm_stats"]` structure:
`{dataset_key: {"action": {"q01": [7], "q99": [7], "mask": [bool x 7], ...}, ...}}`. Dims with mask False (the
gripper for EEF_POS datasets) are neither normalized nor unnormalized.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ..errors import VlaBenchError, choices

# the reference adds this to the range when normalizing so that a constant dimension does not divide by zero
_EPS = 1e-8


def action_stats(norm_stats: Mapping, unnorm_key: str | None, where: str = "") -> dict[str, np.ndarray]:
    """The q01/q99/mask arrays of one dataset key, with the reference's key rules: with no key there must be
    exactly one dataset; an unknown key is an error that lists the keys present."""
    keys = sorted(norm_stats)
    if unnorm_key is None:
        if len(keys) != 1:
            raise VlaBenchError(f"{where}the checkpoint has norm stats for several datasets; set unnorm_key to one "
                                f"of: {choices(keys)}")
        unnorm_key = keys[0]
    if unnorm_key not in norm_stats:
        raise VlaBenchError(f"{where}unnorm_key {unnorm_key!r} is not in the checkpoint's norm stats; "
                            f"present: {choices(keys)}")
    a = norm_stats[unnorm_key]["action"]
    q01 = np.asarray(a["q01"], dtype=np.float64)
    q99 = np.asarray(a["q99"], dtype=np.float64)
    mask = np.asarray(a.get("mask", [True] * len(q01)), dtype=bool)
    return {"q01": q01, "q99": q99, "mask": mask}


def normalize(actions, q01, q99, mask) -> np.ndarray:
    """Raw actions (..., D) -> [-1, 1] on masked dims (clipped), other dims unchanged (training side)."""
    x = np.asarray(actions, dtype=np.float64)
    scaled = np.clip(2.0 * (x - q01) / (q99 - q01 + _EPS) - 1.0, -1.0, 1.0)
    out = np.where(mask, scaled, x)
    # the reference zeroes dimensions that never vary (their normalized value would be meaningless)
    return np.where(mask & (q01 == q99), 0.0, out)


def unnormalize(normalized, q01, q99, mask) -> np.ndarray:
    """Normalized actions (..., D) -> raw units on masked dims; other dims pass through (still bin centres)."""
    x = np.asarray(normalized, dtype=np.float64)
    return np.where(mask, 0.5 * (x + 1.0) * (q99 - q01) + q01, x)
