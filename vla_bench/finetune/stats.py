"""Norm stats over a training set, in OpenVLA's `dataset_statistics.json` structure, under the unnorm key:

    {"<unnorm_key>": {"action":  {"mean", "std", "max", "min", "q01", "q99": [7], "mask": [bool x 7]},
                      "proprio": {"mean", "std", "max", "min", "q01", "q99": [7]},
                      "num_transitions": int, "num_trajectories": int}}

As the reference computes them (prismatic/vla/datasets/rlds/utils/data_utils.py): float32 actions, np.quantile 0.01
/ 0.99 per dimension over every transition, mask [True] * 6 + [False] (EEF_POS: the gripper is not normalized),
proprio stats over zeros, since OpenVLA trains without proprio. vla_bench/openvla/normalization.py reads "q01",
"q99" and "mask"; checkpoint.py reads the file back from the run folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import VlaBenchError

#: EEF_POS datasets: arm dims normalized, gripper passed through (prismatic/vla/datasets/rlds/oxe/materialize.py)
EEF_POS_MASK = (True,) * 6 + (False,)
FILENAME = "dataset_statistics.json"


def _summary(x: np.ndarray) -> dict:
    return {"mean": x.mean(0).tolist(), "std": x.std(0).tolist(), "max": x.max(0).tolist(), "min": x.min(0).tolist(),
            "q01": np.quantile(x, 0.01, axis=0).tolist(), "q99": np.quantile(x, 0.99, axis=0).tolist()}


def compute_norm_stats(actions, num_trajectories: int, mask: Sequence[bool] = EEF_POS_MASK) -> dict:
    """The stats of one dataset key from its (N, D) training actions."""
    a = np.asarray(actions, dtype=np.float32)
    if a.ndim != 2 or len(a) == 0:
        raise VlaBenchError(f"norm stats need a non-empty (N, D) array of actions, got shape {a.shape}")
    if len(mask) != a.shape[1]:
        raise VlaBenchError(f"mask has {len(mask)} entries for {a.shape[1]}-dim actions")
    return {"action": {**_summary(a), "mask": [bool(m) for m in mask]},
            "proprio": _summary(np.zeros_like(a)),
            "num_transitions": int(len(a)), "num_trajectories": int(num_trajectories)}


def dataset_statistics(data, unnorm_key: str, mask: Sequence[bool] = EEF_POS_MASK) -> dict:
    """{unnorm_key: stats} for a finetune.data.TrainingData (or anything with .actions() and .trajectories)."""
    if not unnorm_key:
        raise VlaBenchError("norm stats need an unnorm key (e.g. libero_spatial_no_noops)")
    return {unnorm_key: compute_norm_stats(data.actions(), len(data.trajectories), mask)}


def write_dataset_statistics(folder: str | Path, statistics: Mapping) -> Path:
    """Write `dataset_statistics.json` with the reference's indent=2."""
    path = Path(folder) / FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(statistics, indent=2) + "\n")
    return path


def normalize_actions(actions, statistics: Mapping, unnorm_key: str) -> np.ndarray:
    """Training targets -> BOUNDS_Q99 normalized values through the one home of that rule (openvla/normalization)."""
    from ..openvla.normalization import action_stats, normalize

    s = action_stats(statistics, unnorm_key)
    return normalize(actions, s["q01"], s["q99"], s["mask"])
