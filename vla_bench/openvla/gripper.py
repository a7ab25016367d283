"""Gripper post-processing per suite family: the one home of the gripper sign conventions.

OpenVLA predicts the gripper dimension un-normalized, in the training data's convention 1 = open, 0 = closed
(decoded as a bin centre, ~0.996 or 0.0). LIBERO's controller wants -1 = open, +1 = close, so the LIBERO chain maps
g -> sign(2g - 1) and then inverts. Bridge's WidowX takes the value as predicted.
"""
from __future__ import annotations

import numpy as np

FAMILIES = ("libero", "bridge")


def libero_to_training(gripper) -> np.ndarray:
    """LIBERO's gripper command (-1 open, +1 close) -> the training convention (1 open, 0 closed): `1 - clip(g, 0,
    1)`, as OpenVLA's LIBERO dataset transform does; `postprocess(..., "libero")` is its inverse at evaluation."""
    return 1.0 - np.clip(np.asarray(gripper, dtype=np.float64), 0.0, 1.0)


def postprocess(actions, family: str) -> np.ndarray:
    """(..., 7) actions -> the same with the last dim in the family's gripper convention."""
    out = np.array(actions, dtype=np.float64, copy=True)
    if family == "libero":
        # sign(2g - 1), then inverted; written as a comparison so that huge inputs cannot overflow. The reference's
        # sign() would give 0 (no command) at g = 0.5 exactly; no bin centre is 0.5, so decoded actions never hit
        # it, and for other inputs a definite command is safer: 0.5 counts as open
        out[..., -1] = np.where(out[..., -1] >= 0.5, -1.0, 1.0)
    elif family == "bridge":
        pass
    else:
        raise ValueError(f"unknown gripper family {family!r}; valid: {', '.join(FAMILIES)}")
    return out
