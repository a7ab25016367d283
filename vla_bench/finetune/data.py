"""Training examples for OpenVLA-style fine-tuning, from LIBERO HDF5 demos or RLDS datasets, without TensorFlow.

Every source becomes a list of `Trajectory`s whose actions are already the *training targets*:

- dims 0-5: the recorded end-effector deltas (LIBERO: OSC_POSE commands in [-1, 1]; Bridge: reached-state deltas);
- dim 6: the gripper in OpenVLA's dataset convention, 1 = open, 0 = closed. LIBERO records -1 = open, +1 = close,
  and OpenVLA's `libero_dataset_transform` maps it with g -> 1 - clip(g, 0, 1). Evaluation inverts exactly that
  (vla_bench/gripper.py: 2g - 1, sign, negate), so a model trained on these targets drives LIBERO right.
- frames upright, as OpenVLA's RLDS conversion stores them and as evaluation feeds them: LIBERO's HDF5 renders are
  upside down and are rotated 180 degrees here ([::-1, ::-1]); RLDS LIBERO frames are already rotated.

No-op filtering (LIBERO sources, on by default) follows OpenVLA's `regenerate_libero_dataset.py`: a step is dropped
when ||a[0:6]||_2 < 1e-4 and its gripper command equals that of the previous *kept* step; the first step is tested on
the norm alone. At 20 Hz such steps dominate and a fine-tune collapses toward zero motion without this filter. (The
reference replays the kept actions in the simulator; filtering recorded data offline keeps the recorded frames, which
differ from a replay only by the motion the skipped steps let the arm coast through.)

Optional temporal subsampling (`action_repeat = k > 1`) turns every k consecutive kept steps into one example: the
frame at the window's first step, the *sum* of the window's arm deltas, the window's *last* gripper command. The
execution rule that replays this at evaluation — repeat the unnormalized arm action divided by k for k env steps,
the gripper as predicted — is `execution_rule(k)` (its one home: vla_bench/policies/repeat.py, which also replays
it); it goes into the checkpoint (train_config.json, and `action_repeat = k` in the checkpoints.toml entry), and the
openvla kind executes it. A trailing partial window of m < k steps is kept too, since executing its sum / k for k
steps moves the arm by the same total. Summing axis-angle rotation deltas is exact only for small rotations, which
per-step deltas are.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..errors import VlaBenchError, choices
from ..gripper import MODEL_CONVENTION, libero_to_training
from ..policies.repeat import execution_rule  # one home, beside its replay at evaluation

#: OpenVLA's no-op threshold on ||a[0:6]||_2 (regenerate_libero_dataset.py)
NOOP_THRESHOLD = 1e-4
SOURCE_KINDS = ("libero_hdf5", "libero_rlds", "bridge_rlds")


# ---- pure transforms ----------------------------------------------------------------------------------------------
def noop_mask(actions, threshold: float = NOOP_THRESHOLD) -> np.ndarray:
    """Boolean keep-mask over the steps of one episode: OpenVLA's no-op rule (see the module docstring).

    Applied to raw actions (LIBERO's -1 / +1 gripper), as the reference does."""
    a = np.asarray(actions, dtype=np.float64)
    keep = np.zeros(len(a), dtype=bool)
    small = np.linalg.norm(a[:, :-1], axis=1) < threshold
    prev_gripper = None  # the gripper of the previous *kept* action; None before the first kept step
    for t in range(len(a)):
        if small[t] and (prev_gripper is None or a[t, -1] == prev_gripper):
            continue
        keep[t] = True
        prev_gripper = a[t, -1]
    return keep


# the gripper convention has one home, beside its inverse at evaluation
libero_gripper_to_training = libero_to_training


def aggregate_steps(actions, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(aggregated actions, index of each window's first step): windows of k steps, arm dims summed, gripper =
    the window's last value. A trailing partial window is aggregated the same way."""
    a = np.asarray(actions, dtype=np.float64)
    if k < 1:
        raise VlaBenchError(f"action_repeat must be at least 1, got {k}")
    starts = np.arange(0, len(a), k)
    if k == 1 or len(a) == 0:
        return a.copy(), starts
    arm = np.add.reduceat(a[:, :-1], starts, axis=0)  # sums over [start_i, start_{i+1})
    last = np.minimum(starts + k, len(a)) - 1
    return np.concatenate([arm, a[last, -1:]], axis=1), starts


# ---- trajectories -------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Trajectory:
    episode_id: str
    instruction: str
    actions: np.ndarray  # (T, 7) float32 training targets (see the module docstring)
    frames: np.ndarray  # (T,) index of each example's frame in the recorded episode
    images: "FrameSource | None"  # the primary camera, upright
    wrist_images: "FrameSource | None" = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.actions)

    def image(self, t: int) -> np.ndarray:
        if self.images is None:
            raise VlaBenchError(f"{self.source}: {self.episode_id} was loaded without images")
        return self.images.frame(int(self.frames[t]))


class ArrayFrames:
    """Frames held in memory (RLDS episodes arrive decoded)."""

    def __init__(self, frames: np.ndarray, flip: bool = False):
        self.array = np.ascontiguousarray(frames[:, ::-1, ::-1]) if flip else frames

    def frame(self, i: int) -> np.ndarray:
        return self.array[i]


class HDF5Frames:
    """Frames read from a LIBERO HDF5 file on demand, one at a time: a suite's demos at 256x256 are ~12 GB raw.

    The file is opened lazily per process (h5py handles must not cross a fork into DataLoader workers)."""

    def __init__(self, path: str | os.PathLike, dataset: str, flip: bool = True):
        self.path, self.dataset, self.flip = str(path), dataset, flip
        self._file, self._pid = None, None

    def frame(self, i: int) -> np.ndarray:
        import h5py

        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        img = self._file[self.dataset][i]
        return np.ascontiguousarray(img[::-1, ::-1]) if self.flip else img

    def __getstate__(self):
        return {"path": self.path, "dataset": self.dataset, "flip": self.flip}

    def __setstate__(self, state):
        self.__init__(state["path"], state["dataset"], state["flip"])


def _finish(actions_raw: np.ndarray, gripper_libero: bool, filter_noops: bool, action_repeat: int,
            stats: dict) -> tuple[np.ndarray, np.ndarray]:
    """Raw per-step actions -> (training targets, frame index per target): no-op filter, gripper, subsampling."""
    a = np.asarray(actions_raw, dtype=np.float64)
    kept = np.nonzero(noop_mask(a))[0] if filter_noops else np.arange(len(a))
    stats["noops_dropped"] += len(a) - len(kept)
    a = a[kept]
    if gripper_libero:
        a = np.concatenate([a[:, :6], libero_gripper_to_training(a[:, 6])[:, None]], axis=1)
    agg, starts = aggregate_steps(a, action_repeat)
    return agg.astype(np.float32), kept[starts]


def libero_hdf5_trajectories(paths: str | os.PathLike | Sequence[str | os.PathLike], *, images: bool = True,
                             wrist: bool = False, filter_noops: bool = True, action_repeat: int = 1,
                             stats: dict | None = None) -> Iterator[Trajectory]:
    """LIBERO HDF5 demos (the published files or `vla-bench collect`'s) as training trajectories."""
    from ..data.libero_hdf5 import read_libero_demos

    stats = _counts() if stats is None else stats
    listed = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    for path in listed:
        for demo in read_libero_demos(path, images=False):
            key = demo["episode_metadata"]["demo_key"]
            actions, frames = _finish(demo["steps"]["action"], True, filter_noops, action_repeat, stats)
            if not len(actions):
                continue
            obs = f"data/{key}/obs/"
            yield Trajectory(f"{Path(path).stem}/{key}", demo["episode_metadata"]["language_instruction"], actions,
                             frames, HDF5Frames(path, obs + "agentview_rgb") if images else None,
                             HDF5Frames(path, obs + "eye_in_hand_rgb") if images and wrist else None, str(path))


def libero_rlds_trajectories(root: str | os.PathLike, split: str = "train", *, images: bool = True,
                             wrist: bool = False, filter_noops: bool = True, action_repeat: int = 1,
                             stats: dict | None = None) -> Iterator[Trajectory]:
    """OpenVLA's LIBERO RLDS (`modified_libero_rlds/libero_*_no_noops`: steps/observation/image, wrist_image,
    steps/action with LIBERO's raw gripper, steps/language_instruction). Those files are filtered already and the
    rule is idempotent, so filtering again changes nothing."""
    from ..data.rlds import RLDSDataset

    stats = _counts() if stats is None else stats
    dataset = RLDSDataset(root)
    features = ["steps/action", "steps/language_instruction"]
    features += ["steps/observation/image"] if images else []
    features += ["steps/observation/wrist_image"] if images and wrist else []
    for index, episode in enumerate(dataset.episodes(split, features=features)):
        steps = episode["steps"]
        texts = [t for t in steps["language_instruction"] if t]
        actions, frames = _finish(steps["action"], True, filter_noops, action_repeat, stats)
        if not texts or not len(actions):
            continue
        obs = steps.get("observation", {})
        yield Trajectory(f"{split}-{index:06d}", texts[0], actions, frames,
                         ArrayFrames(obs["image"]) if images else None,
                         ArrayFrames(obs["wrist_image"]) if images and wrist else None, str(dataset.dir))


def bridge_rlds_trajectories(root: str | os.PathLike, split: str = "train", *, images: bool = True,
                             action_repeat: int = 1, stats: dict | None = None, **_ignored) -> Iterator[Trajectory]:
    """Bridge V2 as OpenVLA trains on it (`bridge_orig`: relabelled deltas, binarized gripper 1 = open), through
    vla_bench.data.bridge. No no-op filter: OpenVLA applies none to Bridge."""
    from ..data.bridge import bridge_episodes

    stats = _counts() if stats is None else stats
    for gt in bridge_episodes(root, split, images=images):
        actions, frames = _finish(gt["action"], False, False, action_repeat, stats)
        yield Trajectory(gt["episode_id"], gt["instruction"], actions, frames,
                         ArrayFrames(gt["image"]) if images else None, None, gt["source"])


def _counts() -> dict:
    return {"noops_dropped": 0}


# ---- the training set ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainingData:
    """Map-style dataset over all examples of some trajectories (torch's DataLoader takes it as is)."""

    trajectories: list[Trajectory]
    info: dict

    def __post_init__(self):
        lengths = np.array([len(t) for t in self.trajectories], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(lengths)])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        traj = int(np.searchsorted(self._offsets, i, side="right") - 1)
        return traj, i - int(self._offsets[traj])

    def __getitem__(self, i: int) -> dict:
        k, t = self.locate(int(i))
        traj = self.trajectories[k]
        item = {"instruction": traj.instruction, "action": traj.actions[t], "episode_id": traj.episode_id,
                "step": t}
        if traj.images is not None:
            item["image"] = traj.image(t)
        if traj.wrist_images is not None:
            item["wrist_image"] = traj.wrist_images.frame(int(traj.frames[t]))
        return item

    def actions(self) -> np.ndarray:
        """(N, 7) all training targets, for norm stats."""
        if not self.trajectories:
            return np.zeros((0, 7), np.float32)
        return np.concatenate([t.actions for t in self.trajectories])

    def split(self, holdout_fraction: float, seed: int = 0) -> tuple["TrainingData", "TrainingData"]:
        """(train, held-out) by whole trajectories (neighbouring frames of one episode would leak across a
        per-frame split), chosen by a seeded permutation; at least one trajectory is held out when the fraction
        is positive and there are two or more."""
        if not 0.0 <= holdout_fraction < 1.0:
            raise VlaBenchError(f"holdout fraction must lie in [0, 1), got {holdout_fraction}")
        n = len(self.trajectories)
        n_hold = int(round(n * holdout_fraction))
        if holdout_fraction > 0 and n >= 2:
            n_hold = min(max(n_hold, 1), n - 1)
        order = np.random.default_rng(seed).permutation(n)
        held = set(order[:n_hold].tolist())
        train = [t for i, t in enumerate(self.trajectories) if i not in held]
        hold = [t for i, t in enumerate(self.trajectories) if i in held]
        return (TrainingData(train, {**self.info, "split": "train"}),
                TrainingData(hold, {**self.info, "split": "heldout"}))


def load_training_data(kind: str, paths: str | os.PathLike | Sequence[str | os.PathLike], *, split: str = "train",
                       images: bool = True, wrist: bool = False, filter_noops: bool = True,
                       action_repeat: int = 1, control_hz: float = 20.0) -> TrainingData:
    """All trajectories of one source, with `info` recording how they were made (counts, conventions, filter,
    the execution rule): the trainer writes it into the checkpoint."""
    if kind not in SOURCE_KINDS:
        raise VlaBenchError(f"unknown training data kind {kind!r}; valid: {choices(SOURCE_KINDS)}")
    if action_repeat < 1:
        raise VlaBenchError(f"action_repeat must be at least 1, got {action_repeat}")
    counts = _counts()
    if kind == "libero_hdf5":
        listed = _hdf5_files(paths)
        trajectories = list(libero_hdf5_trajectories(listed, images=images, wrist=wrist, filter_noops=filter_noops,
                                                     action_repeat=action_repeat, stats=counts))
        sources = [str(p) for p in listed]
    else:
        if not isinstance(paths, (str, os.PathLike)):
            raise VlaBenchError(f"{kind} reads one dataset directory, got {len(paths)} paths")
        make = libero_rlds_trajectories if kind == "libero_rlds" else bridge_rlds_trajectories
        trajectories = list(make(paths, split, images=images, wrist=wrist, filter_noops=filter_noops,
                                 action_repeat=action_repeat, stats=counts))
        sources = [str(paths)]
        if kind == "bridge_rlds":
            control_hz = 5.0
    if not trajectories:
        raise VlaBenchError(f"no training examples in {', '.join(sources)}")
    info = {"kind": kind, "sources": sources, "split": split,
            "num_trajectories": len(trajectories), "num_transitions": int(sum(len(t) for t in trajectories)),
            "noop_filter": {"enabled": filter_noops and kind != "bridge_rlds", "threshold": NOOP_THRESHOLD,
                            "dropped": counts["noops_dropped"]},
            "gripper_convention": MODEL_CONVENTION, "images_upright": True,
            "execution": execution_rule(action_repeat, control_hz)}
    return TrainingData(trajectories, info)


def _hdf5_files(paths) -> list[Path]:
    listed = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files: list[Path] = []
    for p in map(Path, listed):
        if p.is_dir():
            found = sorted(p.glob("*.hdf5"))
            if not found:
                raise VlaBenchError(f"{p}: no *.hdf5 demonstration files (vla-bench collect writes them)")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise VlaBenchError(f"{p}: no such file or folder")
    return files


def iter_examples(data: TrainingData) -> Iterable[dict]:
    """Every example in order (for stats or a quick look); training samples through `data[i]`."""
    return (data[i] for i in range(len(data)))
