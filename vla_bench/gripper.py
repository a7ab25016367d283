"""Gripper conventions: the one home of how each side of vla-bench encodes open and closed.

Two conventions meet in this project:

- `OPEN_IS_1`: 1 = open, 0 = closed. Bridge V2's data, OpenVLA's training targets, and so what OpenVLA predicts
  (decoded as a bin centre, ~0.996 or 0.0).
- `OPEN_IS_MINUS_1`: -1 = open, +1 = close. LIBERO's controller, and so LIBERO's recorded actions.

A suite declares which one its actions use (vla_bench/suites.py); the open-loop metrics read each side's gripper
through `is_open`; the OpenVLA chain maps its output with `postprocess`; training targets are made with
`libero_to_training`; a remote policy server's answer is read with `server_to_libero`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .errors import VlaBenchError, choices

OPEN_IS_1 = "open_is_1"
OPEN_IS_MINUS_1 = "open_is_minus_1"

#: the convention of OpenVLA's training targets and of its un-normalized output
MODEL_CONVENTION = OPEN_IS_1

#: convention -> maps a gripper value to its "openness" in [0, 1] (1 = fully open); thresholded at 0.5
OPENNESS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    OPEN_IS_1: lambda g: g,
    OPEN_IS_MINUS_1: lambda g: (1.0 - g) / 2.0,
}


def check_convention(convention: str) -> str:
    if convention not in OPENNESS:
        raise VlaBenchError(f"unknown gripper convention {convention!r}; choices: {choices(OPENNESS)}")
    return convention


def is_open(values, convention: str) -> np.ndarray:
    """True where the gripper value means "open" under `convention`: its openness (see OPENNESS) > 0.5."""
    return OPENNESS[check_convention(convention)](np.asarray(values, dtype=np.float64)) > 0.5


def libero_to_training(gripper) -> np.ndarray:
    """LIBERO's gripper command (-1 open, +1 close) -> the training convention (1 open, 0 closed): `1 - clip(g, 0,
    1)`, as OpenVLA's LIBERO dataset transform does; `postprocess(..., OPEN_IS_MINUS_1)` is its inverse."""
    return 1.0 - np.clip(np.asarray(gripper, dtype=np.float64), 0.0, 1.0)


def postprocess(actions, convention: str) -> np.ndarray:
    """(..., 7) model actions (gripper in MODEL_CONVENTION) -> the same with the last dim in `convention`.

    To LIBERO's: g -> sign(2g - 1), then inverted, as the reference's LIBERO chain does; to Bridge's: as predicted."""
    out = np.array(actions, dtype=np.float64, copy=True)
    if check_convention(convention) == OPEN_IS_MINUS_1:
        # written as a comparison so that huge inputs cannot overflow. The reference's sign() would give 0 (no
        # command) at g = 0.5 exactly; no bin centre is 0.5, so decoded actions never hit it, and for other inputs
        # a definite command is safer: 0.5 counts as open
        out[..., -1] = np.where(out[..., -1] >= 0.5, -1.0, 1.0)
    return out


#: the conventions a remote policy server may answer in (a checkpoints.toml `gripper` value of kind "remote") ->
#: how `server_to_libero` turns its last dim into LIBERO's (-1 open, +1 close)
SERVER_CONVENTIONS = {
    "libero": "-1 open, +1 close (LIBERO's own; passed through)",
    "open-positive": "+1 open, -1 close (negated)",
    "open-one": "1 open, 0 closed (OpenVLA's training data; thresholded at 0.5)",
    "close-one": "0 open, 1 closed (mapped to 2g - 1)",
}


def server_to_libero(actions, convention: str) -> np.ndarray:
    """(..., 7) actions whose gripper is in a SERVER_CONVENTIONS convention -> the same in LIBERO's."""
    out = np.array(actions, dtype=np.float64, copy=True)
    g = out[..., -1]
    if convention == "open-positive":
        out[..., -1] = -g
    elif convention == "open-one":
        out = postprocess(out, OPEN_IS_MINUS_1)
    elif convention == "close-one":
        out[..., -1] = 2.0 * g - 1.0
    elif convention != "libero":
        raise VlaBenchError(f"unknown server gripper convention {convention!r}; choices: {choices(SERVER_CONVENTIONS)}")
    return out
