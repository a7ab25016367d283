"""The demo files of `vla-bench collect`: one LIBERO-layout HDF5 file per task, and the state a resumed run reads
back from it (demos kept, seeds that failed, how they were collected).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import h5py

from ..data.libero_hdf5 import demo_keys, write_libero_demos
from ..envs.libero import RANDOM_RESET_VERSION
from ..errors import VlaBenchError

FAILED_ATTR = "vla_bench_failed_seeds"
RESET_ATTR = "vla_bench_random_reset_version"
NOISE_ATTR = "vla_bench_action_noise"


def task_file(out_dir: str | os.PathLike, suite: str, task_name: str) -> Path:
    return Path(out_dir) / suite / f"{task_name}_demo.hdf5"


def open_task_file(path: Path, task, suite: str, env_args: dict, action_noise: float = 0.0
                    ) -> tuple[int, set, set]:
    """Create the task's file, or read back (demo count, kept seeds, failed seeds) of an existing one."""
    if not path.exists():
        problem, domain = bddl_names(task.bddl_path)
        write_libero_demos(path, [], task.language, problem_name=problem, domain_name=domain,
                           bddl_file_name=task.bddl_path, env_args=env_args)
        with h5py.File(path, "a") as f:
            f["data"].attrs[FAILED_ATTR] = "[]"
            f["data"].attrs[RESET_ATTR] = RANDOM_RESET_VERSION
            f["data"].attrs[NOISE_ATTR] = float(action_noise)
        return 0, set(), set()
    try:
        with h5py.File(path, "r") as f:
            data = f["data"]
            keys = demo_keys(data)
            version = int(data.attrs.get(RESET_ATTR, 1))
            noise = float(data.attrs.get(NOISE_ATTR, 0.0))
            kept = {int(data[k].attrs["seed"]) for k in keys if "seed" in data[k].attrs}
            failed = set(json.loads(data.attrs.get(FAILED_ATTR, "[]")))
            language = json.loads(data.attrs.get("problem_info", "{}")).get("language_instruction", "")
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise VlaBenchError(f"{path}: cannot resume from this file ({e}); it may have been cut off mid-write. "
                            "Move it away (its complete demos can be copied out with h5py) and run again") from e
    if language and language != task.language:
        raise VlaBenchError(f"{path} holds demos of {language!r}, not of {task.language!r}: choose another --out")
    if version != RANDOM_RESET_VERSION and (keys or failed):
        raise VlaBenchError(f"{path} was collected with random-reset version {version}, this vla-bench resets with "
                            f"version {RANDOM_RESET_VERSION} (see envs/libero.py: scenes differ), so its demos cannot "
                            "be continued: delete the file or choose another --out")
    if noise != action_noise and (keys or failed):
        raise VlaBenchError(f"{path} was collected with --action-noise {noise:g}, not {action_noise:g}: pass "
                            f"--action-noise {noise:g} to continue it, or choose another --out")
    return len(keys), kept, failed


def bddl_names(bddl_path: str) -> tuple[str, str]:
    """(problem name, domain name) as LIBERO's problem_info stores them: '(problem LIBERO_Tabletop_Manipulation)'
    -> 'libero_tabletop_manipulation', '(:domain robosuite)' -> 'robosuite'."""
    import re

    text = Path(bddl_path).read_text()[:2000]
    problem = re.search(r"\(problem\s+([^\s)]+)", text)
    domain = re.search(r"\(:domain\s+([^\s)]+)", text)
    return (problem.group(1).lower() if problem else "", domain.group(1) if domain else "")


def record_failure(path: Path, seed: int) -> None:
    with h5py.File(path, "a") as f:
        data = f["data"]
        failed = json.loads(data.attrs.get(FAILED_ATTR, "[]"))
        data.attrs[FAILED_ATTR] = json.dumps(failed + [int(seed)])
