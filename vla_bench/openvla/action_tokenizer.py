"""OpenVLA's action tokenizer: one home for the 256 bins on [-1, 1] and the token <-> value arithmetic.

Each normalized action dimension is clipped to [-1, 1], digitized against 256 uniform bin edges and mapped to the
token id `vocab_size - d` (d in 1..256), so action tokens are the last 256 ids of the base vocabulary (31744..31999 for
Llama-2's 32000). Decoding maps an id back to one of the 255 bin centres with the clip rule of the reference, so the
ids for d = 255 and d = 256 (the latter only for exactly +1.0) both decode to the top centre.
"""
from __future__ import annotations

import numpy as np

N_BINS = 256
MIN_ACTION = -1.0
MAX_ACTION = 1.0

#: the 256 bin edges and the 255 centres between them (bin width 2/255)
BINS = np.linspace(MIN_ACTION, MAX_ACTION, N_BINS)
BIN_CENTERS = (BINS[:-1] + BINS[1:]) / 2.0


def encode(actions, vocab_size: int) -> np.ndarray:
    """Normalized actions (any shape) -> integer token ids of the same shape, all in [vocab_size-256, vocab_size-1]."""
    a = np.clip(np.asarray(actions, dtype=np.float64), MIN_ACTION, MAX_ACTION)
    # np.digitize with right=False: d = i such that BINS[i-1] <= a < BINS[i]; after the clip d is in 1..256
    d = np.digitize(a, BINS)
    return (vocab_size - d).astype(np.int64)


def decode(token_ids, vocab_size: int) -> np.ndarray:
    """Token ids (any shape) -> normalized actions, each one of the 255 bin centres.

    Ids outside the action range are clipped into it exactly as the reference does (a greedy decoder can emit a
    non-action id from an untrained or broken model; the clip keeps the output finite and in [-1, 1])."""
    d = vocab_size - np.asarray(token_ids, dtype=np.int64)
    idx = np.clip(d - 1, 0, BIN_CENTERS.shape[0] - 1)
    return BIN_CENTERS[idx]


def is_action_token(token_ids, vocab_size: int) -> np.ndarray:
    """True where an id is one of the 256 action ids (the reference's `id > vocab_size - 257`)."""
    t = np.asarray(token_ids)
    return (t > vocab_size - N_BINS - 1) & (t < vocab_size)
