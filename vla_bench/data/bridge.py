"""Bridge V2 ground truth for open-loop evaluation, from the released `bridge_dataset` (OpenVLA's `bridge_orig`).

Two named ground truths:

- "openvla" (the default): what OpenVLA trained on, following its `bridge_orig_dataset_transform`:
  1. drop step 0 (its recorded action is all-zero movement);
  2. binarize the gripper command (1 = open, 0 = closed; see `binarize_gripper`);
  3. relabel dims 0-5 as the reached-state delta `state[t+1, :6] - state[t, :6]` (plain Euler difference, no
     wrap-around handling, as OpenVLA does), keep the binarized gripper, and drop the last step;
  4. camera `image_0` only; episodes whose language instruction is empty on every step are skipped.
  An episode of T recorded steps gives T - 2 frames.
- "raw": the recorded commanded actions (continuous gripper in [0, 1], 1 = open), every step, image_0.

Both yield plain dicts: {"episode_id", "instruction", "image" (T,H,W,3) uint8, "state" (T,7) float32,
"action" (T,7) float32, "source"}. Units: dims 0-2 metres, 3-5 radians, per 5 Hz step.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator, Mapping

import numpy as np

from ..errors import VlaBenchError, choices
from .rlds import RLDSDataset

#: OpenVLA's action statistics for `bridge_orig` (openvla-7b config.json norm_stats["bridge_orig"]["action"];
#: computed over train+val after the step-0 drop and the relabel). BOUNDS_Q99 normalization uses q01/q99 on
#: dims 0-5; the gripper (dim 6) is not normalized.
BRIDGE_ACTION_STATS = {
    "q01": np.array([-0.02872725307941437, -0.04170349963009357, -0.026093858778476715, -0.08092105075716972,
                     -0.09288699507713317, -0.20718276381492615, 0.0]),
    "q99": np.array([0.028309678435325586, 0.040855254605412394, 0.040161586627364146, 0.08192047759890528,
                     0.07792850524187081, 0.20382574498653397, 1.0]),
    "mean": np.array([0.0002334194869035855, 0.00013004911306779832, -0.00012762474943883717,
                      -0.0001556558854645118, -0.0004039328487124294, 0.00023557482927571982, 0.5764579176902771]),
    "std": np.array([0.009765930473804474, 0.013689135201275349, 0.012667362578213215, 0.028534092009067535,
                     0.030637972056865692, 0.07691419124603271, 0.4973701536655426]),
    "mask": np.array([True] * 6 + [False]),
}

_IMAGE_KEY = "steps/observation/image_0"
_NEEDED = ("steps/observation/state", "steps/action", "steps/language_instruction", "episode_metadata/file_path")


def binarize_gripper(gripper: np.ndarray) -> np.ndarray:
    """OpenVLA's `binarize_gripper_actions`: > 0.95 -> 1 (open), < 0.05 -> 0 (closed); an in-between value takes
    the value of the next step that is not in between (scanning backwards from the end). A trailing run of
    in-between values takes the last raw value (the scan's initial carry), exactly as OpenVLA does."""
    g = np.asarray(gripper, dtype=np.float32)
    out = np.empty_like(g)
    carry = g[-1] if len(g) else np.float32(0)
    for t in range(len(g) - 1, -1, -1):
        if g[t] > 0.95:
            carry = np.float32(1.0)
        elif g[t] < 0.05:
            carry = np.float32(0.0)
        out[t] = carry
    return out


def _instruction(episode: Mapping) -> str:
    texts = [t for t in episode["steps"]["language_instruction"] if t]
    return texts[0] if texts else ""


def openvla_ground_truth(episode: Mapping) -> dict | None:
    """OpenVLA's `bridge_orig` view of one decoded RLDS episode (see the module docstring); None if unlabeled or
    too short to give a frame (fewer than 3 steps)."""
    steps = episode["steps"]
    instruction = _instruction(episode)
    state, action = steps["observation"]["state"], steps["action"]
    if not instruction or len(action) < 3:
        return None
    state, action = state[1:], action[1:]  # 1. drop step 0
    gripper = binarize_gripper(action[:, 6])  # 2. binarize (over the remaining steps, like OpenVLA)
    relabeled = np.concatenate([state[1:, :6] - state[:-1, :6], gripper[:-1, None]], axis=1)  # 3. relabel, drop last
    out = {"instruction": instruction, "state": state[:-1].astype(np.float32), "action": relabeled.astype(np.float32)}
    if "image_0" in steps["observation"]:
        out["image"] = steps["observation"]["image_0"][1:-1]
    return out


def raw_ground_truth(episode: Mapping) -> dict | None:
    """The recorded commanded actions, every step, image_0; None if unlabeled."""
    steps = episode["steps"]
    instruction = _instruction(episode)
    if not instruction or len(steps["action"]) == 0:
        return None
    out = {"instruction": instruction, "state": steps["observation"]["state"].astype(np.float32),
           "action": steps["action"].astype(np.float32)}
    if "image_0" in steps["observation"]:
        out["image"] = steps["observation"]["image_0"]
    return out


#: ground-truth name -> function(decoded RLDS episode) -> ground-truth dict or None (skipped)
GROUND_TRUTHS: dict[str, Callable[[Mapping], dict | None]] = {
    "openvla": openvla_ground_truth,
    "raw": raw_ground_truth,
}
DEFAULT_GROUND_TRUTH = "openvla"


def bridge_episodes(root: str | os.PathLike, split: str = "val", *, ground_truth: str = DEFAULT_GROUND_TRUTH,
                    images: bool = True, max_episodes: int | None = None,
                    allow_missing_shards: bool = False) -> Iterator[dict]:
    """Stream ground-truth episodes of a Bridge RLDS directory (see the module docstring for the dict).

    Only image_0, state, action and language are decoded (`images=False` skips the JPEGs too). `max_episodes`
    counts yielded (labeled) episodes. Episode ids are "<split>-<index in split>", stable across runs."""
    if ground_truth not in GROUND_TRUTHS:
        raise VlaBenchError(f"unknown Bridge ground truth {ground_truth!r}; choices: {choices(GROUND_TRUTHS)}")
    make = GROUND_TRUTHS[ground_truth]
    dataset = RLDSDataset(root)
    features = list(_NEEDED) + ([_IMAGE_KEY] if images else [])
    yielded = 0
    if max_episodes is not None and max_episodes <= 0:
        return
    for index, episode in enumerate(dataset.episodes(split, features=features,
                                                     allow_missing_shards=allow_missing_shards)):
        gt = make(episode)
        if gt is None:
            continue
        gt["episode_id"] = f"{split}-{index:06d}"
        gt["source"] = episode["episode_metadata"]["file_path"]
        yield gt
        yielded += 1
        if max_episodes is not None and yielded >= max_episodes:
            return
