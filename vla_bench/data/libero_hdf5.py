"""LIBERO's HDF5 demonstration layout (as written by LIBERO's `scripts/create_dataset.py`), read and written with h5py.

    data                       attrs: problem_info (JSON: language_instruction, problem_name, domain_name),
                                      env_args (JSON), bddl_file_name, macros_image_convention, num_demos, total
    data/demo_<i>              attrs: num_samples, init_state, model_file; vla_bench_complete (ours, see below)
    data/demo_<i>/actions      (T, 7) float: OSC_POSE deltas in [-1, 1], gripper -1 = open, +1 = close
    data/demo_<i>/states       (T, N) flattened MuJoCo states
    data/demo_<i>/robot_states (T, 9); rewards (T,), dones (T,) uint8 with 1 on the last step
    data/demo_<i>/obs/agentview_rgb, obs/eye_in_hand_rgb (T, H, W, 3) uint8, as rendered by robosuite
                                      (OpenVLA's RLDS conversion flips them [::-1, ::-1]; policies do that themselves)
    data/demo_<i>/obs/ee_states (T, 6: pos + axis-angle), gripper_states (T, 2), joint_states (T, 7), ...

`read_libero_demos` yields the same nested episode dicts as the RLDS reader ("steps/observation/...",
"steps/action", "steps/language_instruction", "episode_metadata/..."); `libero_episodes` turns them into the
open-loop ground-truth dicts the proxy engine consumes; `write_libero_demos` writes the layout (the scripted-expert
demo collector uses it).

A demo is appended in place, and a writer can be killed half way through one. So a demo group that vla-bench writes
carries `vla_bench_complete = False` from its creation until its data are flushed to disk, then True: readers skip
a group still marked False, and the next append removes it. Groups without the attribute (LIBERO's own files) are
complete. The rest of the file is never rewritten, so a kill loses at most the demo being written.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import h5py
import numpy as np

from ..errors import VlaBenchError

_DEMO = re.compile(r"^demo_(\d+)$")
#: False while a demo group is being written, True once its data are on disk (absent in LIBERO's own files)
COMPLETE_ATTR = "vla_bench_complete"


def language_from_filename(path: str | os.PathLike) -> str:
    """OpenVLA's rule for LIBERO files without problem_info: the words of the file name after the last word that
    contains "SCENE", without the `_demo.hdf5` suffix ("KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5" ->
    "turn on the stove")."""
    stem = Path(path).name
    stem = stem[: -len("_demo.hdf5")] if stem.endswith("_demo.hdf5") else Path(stem).stem
    words = stem.split("_")
    scene = [i for i, w in enumerate(words) if "SCENE" in w]
    return " ".join(words[scene[-1] + 1:] if scene else words)


def _attr_text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _file_language(data: h5py.Group, path: Path) -> tuple[str, dict]:
    """(instruction, problem_info) of a LIBERO file: problem_info's language_instruction, else the file name."""
    if "problem_info" in data.attrs:
        try:
            info = json.loads(_attr_text(data.attrs["problem_info"]))
        except json.JSONDecodeError as e:
            raise VlaBenchError(f"{path}: attribute data.problem_info is not valid JSON ({e})") from e
        language = info.get("language_instruction", "")
        if isinstance(language, list):  # some LIBERO files store it as a list of words/characters
            language = "".join(language)
        if str(language).strip():
            return str(language).strip().strip('"'), info
        return language_from_filename(path), info
    return language_from_filename(path), {}


def demo_keys(data: h5py.Group) -> list[str]:
    """The complete demo groups' names in numeric order (demo_2 before demo_10)."""
    return [k for k in _all_demo_keys(data) if bool(data[k].attrs.get(COMPLETE_ATTR, True))]


def _all_demo_keys(data: h5py.Group) -> list[str]:
    return sorted((k for k in data.keys() if _DEMO.match(k)), key=lambda k: int(_DEMO.match(k).group(1)))


def read_libero_demos(path: str | os.PathLike, *, images: bool = True,
                      max_demos: int | None = None) -> Iterator[dict]:
    """Stream the demos of one LIBERO HDF5 file, one demo in memory at a time, as nested episode dicts.

    `images=False` leaves out the *_rgb / *_depth observations (nothing else reads them off disk)."""
    path = Path(path)
    if not path.is_file():
        raise VlaBenchError(f"LIBERO demo file {path} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise VlaBenchError(f"{path} is not a readable HDF5 file ({e})") from e
    with f:
        where = "the file's index"
        try:  # libhdf5 reports damage inside a file as OSError, RuntimeError, KeyError or ValueError
            if "data" not in f:
                raise VlaBenchError(f"{path} has no 'data' group: not a LIBERO demo file (top-level keys: "
                                    f"{', '.join(f.keys()) or 'none'})")
            data = f["data"]
            language, problem_info = _file_language(data, path)
            keys = demo_keys(data)
            if not keys:
                raise VlaBenchError(f"{path}: 'data' holds no demo_<i> groups")
            for key in keys[:max_demos] if max_demos is not None else keys:
                where = f"data/{key}"
                demo = _read_demo(data[key], key, path, language, problem_info, images)
                where = "the file's index"
                yield demo
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
            raise VlaBenchError(f"{path} is damaged at {where} ({type(e).__name__}: {e}); re-create or "
                                "re-download the file") from e


def _read_demo(demo: h5py.Group, key: str, path: Path, language: str, problem_info: dict, images: bool) -> dict:
    if "actions" not in demo:
        raise VlaBenchError(f"{path}: data/{key} has no 'actions' dataset")
    actions = np.asarray(demo["actions"][()], dtype=np.float32)
    steps = len(actions)
    observation = {}
    if "obs" in demo:
        for name, dataset in demo["obs"].items():
            if not images and (name.endswith("_rgb") or name.endswith("_depth")):
                continue
            observation[name] = dataset[()]
    step_dict = {
        "observation": observation,
        "action": actions,
        "language_instruction": np.array([language] * steps, dtype=object),
    }
    for source, target in (("states", "sim_state"), ("robot_states", "robot_state"), ("rewards", "reward")):
        if source in demo:
            step_dict[target] = demo[source][()]
    if "dones" in demo:
        step_dict["is_last"] = demo["dones"][()].astype(bool)
    metadata = {
        "file_path": str(path),
        "demo_key": key,
        "language_instruction": language,
        "problem_name": str(problem_info.get("problem_name", "")),
    }
    if "init_state" in demo.attrs:
        metadata["init_state"] = np.asarray(demo.attrs["init_state"])
    return {"steps": step_dict, "episode_metadata": metadata}


def libero_episodes(paths: str | os.PathLike | Sequence[str | os.PathLike], *, images: bool = True,
                    max_episodes: int | None = None) -> Iterator[dict]:
    """Open-loop ground truth from LIBERO demo files: {"episode_id" ("<file stem>/demo_<i>"), "instruction",
    "image" (agentview_rgb), "wrist_image" (eye_in_hand_rgb, when stored), "state" (ee_states + gripper_states,
    8-d as OpenVLA's LIBERO state; empty if not stored), "action" (the recorded actions, LIBERO convention),
    "source"}."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise VlaBenchError("no LIBERO demo files given")
    yielded = 0
    for path in paths:
        for episode in read_libero_demos(path, images=images):
            if max_episodes is not None and yielded >= max_episodes:
                return
            obs, steps = episode["steps"]["observation"], episode["steps"]
            parts = [obs[k] for k in ("ee_states", "gripper_states") if k in obs]
            state = np.concatenate(parts, axis=1) if parts else np.zeros((len(steps["action"]), 0))
            gt = {
                "episode_id": f"{Path(path).stem}/{episode['episode_metadata']['demo_key']}",
                "instruction": episode["episode_metadata"]["language_instruction"],
                "state": state.astype(np.float32),
                "action": steps["action"],
                "source": str(path),
            }
            if images and "agentview_rgb" in obs:
                gt["image"] = obs["agentview_rgb"]
            if images and "eye_in_hand_rgb" in obs:
                gt["wrist_image"] = obs["eye_in_hand_rgb"]
            yield gt
            yielded += 1


def write_libero_demos(path: str | os.PathLike, episodes: Iterable[Mapping], language: str, *,
                       problem_name: str = "", domain_name: str = "", bddl_file_name: str = "",
                       env_args: Mapping | None = None, image_convention: str = "opengl",
                       compress_images: bool = False) -> Path:
    """Write demos in LIBERO's HDF5 layout; return the path.

    Each episode is a mapping with "actions" (T, 7) and optionally "obs" ({name: (T, ...) array}, e.g.
    agentview_rgb, eye_in_hand_rgb, ee_states, gripper_states, joint_states), "states", "robot_states", "rewards",
    "dones" (default: 1 on the last step only), "init_state", "model_file" and "attrs" (more demo attributes,
    e.g. the collector's seed). `language` goes into data.attrs["problem_info"]["language_instruction"], where
    LIBERO keeps it. With no episodes the file holds the attributes and no demo (`append_libero_demo` adds them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    total = 0
    partial = path.with_name(path.name + ".partial")  # renamed into place once whole: no half-written file at path
    with h5py.File(partial, "w") as f:
        data = f.create_group("data")
        count = 0
        for i, episode in enumerate(episodes):
            total += _write_demo(data, f"demo_{i}", episode, path, compress_images)
            count += 1
        data.attrs["problem_info"] = json.dumps(
            {"problem_name": problem_name, "domain_name": domain_name, "language_instruction": language})
        data.attrs["env_args"] = json.dumps(dict(env_args or {}))
        data.attrs["bddl_file_name"] = bddl_file_name
        data.attrs["macros_image_convention"] = image_convention
        data.attrs["num_demos"] = count
        data.attrs["total"] = total
    os.replace(partial, path)
    return path


def append_libero_demo(path: str | os.PathLike, episode: Mapping, *, compress_images: bool = False) -> str:
    """Add one demo to an existing LIBERO file (made by `write_libero_demos`, possibly with no demos) as the next
    demo_<i>, update num_demos / total, and close the file, so that a killed writer loses at most this demo.
    Returns the new demo's key."""
    path = Path(path)
    with h5py.File(path, "a") as f:
        if "data" not in f:
            raise VlaBenchError(f"{path} has no 'data' group: not a LIBERO demo file")
        data = f["data"]
        keys = demo_keys(data)
        for stale in set(_all_demo_keys(data)) - set(keys):  # left half-written by a killed writer
            del data[stale]
        key = f"demo_{int(_DEMO.match(keys[-1]).group(1)) + 1 if keys else 0}"
        f.flush()  # the file as it stands is on disk before the new demo's first byte
        steps = _write_demo(data, key, episode, path, compress_images, complete=False)
        f.flush()
        data[key].attrs[COMPLETE_ATTR] = True
        data.attrs["num_demos"] = len(keys) + 1
        data.attrs["total"] = sum(int(data[k].attrs.get("num_samples", 0)) for k in keys) + steps
    return key


def _write_demo(data: h5py.Group, key: str, episode: Mapping, path: Path, compress_images: bool,
                complete: bool = True) -> int:
    """Write one demo group (marked incomplete until the caller has flushed it, unless `complete`); return its
    step count."""
    if "actions" not in episode:
        raise VlaBenchError(f"{key} for {path} has no 'actions'; keys: {', '.join(episode)}")
    actions = np.asarray(episode["actions"], dtype=np.float64)
    steps = len(actions)
    demo = data.create_group(key)
    demo.attrs[COMPLETE_ATTR] = complete
    demo.create_dataset("actions", data=actions)
    last = np.zeros(steps, np.uint8)
    if steps:
        last[-1] = 1
    demo.create_dataset("rewards", data=np.asarray(episode.get("rewards", last)))
    demo.create_dataset("dones", data=np.asarray(episode.get("dones", last)))
    for name in ("states", "robot_states", "executed_actions"):  # the last: vla-bench collect --action-noise
        if name in episode:
            demo.create_dataset(name, data=np.asarray(episode[name]))
    obs = demo.create_group("obs")
    for name, value in episode.get("obs", {}).items():
        value = np.asarray(value)
        if len(value) != steps:
            raise VlaBenchError(f"{key} for {path}: obs/{name} has {len(value)} steps, actions has {steps}")
        is_image = name.endswith("_rgb") or name.endswith("_depth")
        obs.create_dataset(name, data=value,
                           **({"compression": "gzip", "compression_opts": 4} if is_image and compress_images
                              else {}))
    demo.attrs["num_samples"] = steps
    if "init_state" in episode:
        demo.attrs["init_state"] = np.asarray(episode["init_state"])
    if "model_file" in episode:
        demo.attrs["model_file"] = episode["model_file"]
    for name, value in episode.get("attrs", {}).items():
        demo.attrs[name] = value
    return steps
