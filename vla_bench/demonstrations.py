"""The demonstrations of closed-loop tasks, for the summary's action figures beside the policy's own.

Where they are: the checkpoints file's [datasets.SUITE] table of the closed-loop suite itself (e.g.
[datasets.libero_spatial] path = "/data/libero_spatial_no_noops"), else its [datasets.libero_demos] table (the
open-loop suite's demos, which `vla-bench collect` writes); `--vla-data libero_demos=PATH` overrides the latter as
it does for the open-loop suite. A path is a LIBERO HDF5 file or a folder of them; a task's demonstrations are those
of the files whose instruction is the task's, so a folder of another suite's demos simply matches nothing.

Each file's figures are computed once per process and file version (path, size, modification time), whatever the
number of checkpoints and tables that show them.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterable, Mapping

from .data.libero_hdf5 import read_libero_demos
from .errors import VlaBenchError
from .metrics.episode_figures import ActionFigures, action_figures, mean_figures

#: the open-loop suite whose LIBERO demos stand in when a closed-loop suite has no [datasets.SUITE] table
DEMOS_SUITE = "libero_demos"


def dataset_files(registry, suite: str, overrides: Mapping[str, str] | None = None) -> list[Path]:
    """The HDF5 files of the suite's demonstrations (see the module docstring); empty when none is configured or the
    path holds none."""
    overrides = overrides or {}
    if suite in registry.datasets:
        path = Path(registry.dataset(suite)["path"])
    elif DEMOS_SUITE in overrides:
        path = Path(overrides[DEMOS_SUITE])
    elif DEMOS_SUITE in registry.datasets:
        path = Path(registry.dataset(DEMOS_SUITE)["path"])
    else:
        return []
    if path.is_dir():
        return sorted(path.glob("*.hdf5"))
    return [path] if path.is_file() else []


def file_figures(path: Path) -> tuple[str, ActionFigures | None]:
    """(instruction, mean figures over the file's demos) of one LIBERO HDF5 file."""
    stat = path.stat()
    return _file_figures(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _file_figures(path: str, size: int, mtime_ns: int) -> tuple[str, ActionFigures | None]:
    language, figures = "", []
    for demo in read_libero_demos(path, images=False):
        language = demo["episode_metadata"]["language_instruction"]
        figures.append(action_figures(demo["steps"]["action"]))
    return language, mean_figures(figures)


def figures_by_instruction(files: Iterable[Path]) -> tuple[dict[str, ActionFigures], list[str]]:
    """{instruction: mean figures of its demos} over the files, and a note per file that could not be read (a
    summary shows the rest rather than failing)."""
    by_language: dict[str, list[ActionFigures]] = {}
    notes = []
    for path in files:
        try:
            language, figures = file_figures(path)
        except (VlaBenchError, OSError) as e:
            notes.append(f"demonstrations skipped: {e}")
            continue
        if figures is not None:
            by_language.setdefault(language, []).append(figures)
    return {language: mean_figures(figs) for language, figs in by_language.items()}, notes


def task_demonstration_figures(registry, results, overrides: Mapping[str, str] | None = None
                               ) -> tuple[dict[tuple[str, int], ActionFigures], list[str]]:
    """{(suite, task index): the demonstrations' figures} for the closed-loop results (TaskResult) whose task has
    demonstrations, and notes on files that could not be read."""
    from .envs.tasks import suite_tasks

    out, notes = {}, []
    for suite in sorted({r.suite for r in results}):
        files = dataset_files(registry, suite, overrides)
        if not files:
            continue
        try:
            tasks = suite_tasks(suite)
        except (ImportError, VlaBenchError) as e:  # `vla-bench report` on a host without LIBERO's task files
            notes.append(f"demonstrations of {suite} not shown: its task list is unavailable ({e})")
            continue
        by_language, file_notes = figures_by_instruction(files)
        notes.extend(file_notes)
        for r in results:
            if r.suite == suite and r.task_index < len(tasks) and tasks[r.task_index].language in by_language:
                out[(suite, r.task_index)] = by_language[tasks[r.task_index].language]
    return out, notes
