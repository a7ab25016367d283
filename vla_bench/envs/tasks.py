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
    return tuple(
        TaskInfo(suite, i, t.name, t.language, os.path.join(root, t.problem_folder, t.bddl_file))
        for i, t in enumerate(bench.get_task(i) for i in range(bench.n_tasks)))


def init_states(suite: str, index: int) -> np.ndarray:
    """LIBERO's fixed init states of a task: episode i of the protocol starts from row i."""
    return _benchmark(suite).get_task_init_states(index)
