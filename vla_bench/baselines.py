"""Stored baselines: one run's per-episode outcomes as a small JSON file that can be committed (pytest-benchmark style).

`--vla-save NAME` writes `baselines/NAME.json` (relative to the working directory unless a folder is given);
`--vla-compare NAME` and `vla-bench gate A B` read them back. A file holds everything that decides whether two runs
may be compared (suite, protocol, init states) and everything that tells them apart (checkpoint identity, versions):

    {"format": 1, "name": ..., "created": ISO time, "suite": ..., "protocol": {...}, "protocol_key": ...,
     "checkpoint": {"name": ..., "identity": ...}, "versions": {...},
     "tasks": {"task1": {"0": true, "1": false, ...}, ...}}

Init-state indices are JSON object keys, hence strings on disk and ints in memory.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import re
from pathlib import Path
from typing import Any, Mapping

from .errors import VlaBenchError, choices
from .metrics.verdicts import TaskOutcomes
from .options import DEFAULT_BASELINES

FORMAT_VERSION = 1
#: protocol fields that may differ between comparable runs: the episode count only says how many init states ran,
#: and which ones is checked separately (see check_comparable); Protocol.key() leaves it out for the same reason.
NOT_COMPARED = frozenset({"episodes"})
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclasses.dataclass(frozen=True)
class BaselineRun:
    name: str
    suite: str
    protocol: Mapping[str, Any]
    protocol_key: str
    checkpoint: Mapping[str, str]  # {"name": ..., "identity": ...}
    versions: Mapping[str, str]
    tasks: Mapping[str, Mapping[int, bool]]  # task id -> init index -> success
    created: str = ""

    def outcomes(self, task: str) -> TaskOutcomes:
        if task not in self.tasks:
            raise VlaBenchError(f"baseline {self.name!r} has no task {task!r}; it has: {choices(self.tasks)}")
        return TaskOutcomes(task, self.tasks[task])

    def as_json(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "name": self.name,
            "created": self.created,
            "suite": self.suite,
            "protocol": dict(self.protocol),
            "protocol_key": self.protocol_key,
            "checkpoint": dict(self.checkpoint),
            "versions": dict(self.versions),
            "tasks": {task: {str(i): bool(s) for i, s in sorted(episodes.items())}
                      for task, episodes in self.tasks.items()},
        }


def make_baseline(name: str, *, suite: str, protocol: Mapping[str, Any], protocol_key: str, checkpoint_name: str,
                  checkpoint_identity: str, versions: Mapping[str, str],
                  tasks: Mapping[str, Mapping[int, bool]], created: str | None = None) -> BaselineRun:
    """Build a BaselineRun from a finished run, refusing names that are not plain file names and empty runs."""
    check_name(name)
    clean_tasks = {str(task): {int(i): bool(s) for i, s in episodes.items()} for task, episodes in tasks.items()}
    empty = [task for task, episodes in clean_tasks.items() if not episodes]
    if not clean_tasks:
        raise VlaBenchError(f"cannot save baseline {name!r}: the run has no episodes")
    if empty:
        raise VlaBenchError(f"cannot save baseline {name!r}: tasks without episodes: {choices(empty)}")
    return BaselineRun(
        name=name, suite=suite, protocol=dict(protocol), protocol_key=protocol_key,
        checkpoint={"name": checkpoint_name, "identity": checkpoint_identity}, versions=dict(versions),
        tasks=clean_tasks,
        created=created or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def check_name(name: str) -> None:
    if not _NAME.match(name or ""):
        raise VlaBenchError(f"invalid baseline name {name!r}: use letters, digits, '.', '_' and '-', starting with "
                            "a letter or digit")


def baselines_folder(folder: str | Path | None = None) -> Path:
    return Path(folder) if folder is not None else Path.cwd() / DEFAULT_BASELINES


def baseline_path(name: str, folder: str | Path | None = None) -> Path:
    check_name(name)
    return baselines_folder(folder) / f"{name}.json"


def list_baselines(folder: str | Path | None = None) -> list[str]:
    directory = baselines_folder(folder)
    return sorted(p.stem for p in directory.glob("*.json")) if directory.is_dir() else []


def save_baseline(run: BaselineRun, folder: str | Path | None = None) -> Path:
    """Write `run` to FOLDER/NAME.json (replacing an older file of that name) and return the path. Written to a
    temporary file first, so an interrupted save never leaves half a baseline behind."""
    path = baseline_path(run.name, folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(run.as_json(), indent=1, sort_keys=False) + "\n")
    temporary.replace(path)
    return path


def load_baseline(name_or_path: str, folder: str | Path | None = None) -> BaselineRun:
    """Read a baseline by name (FOLDER/NAME.json) or by the path of a .json file."""
    candidate = Path(name_or_path)
    if name_or_path.endswith(".json") or candidate.parent != Path("."):
        path = candidate
        if not path.is_file():
            raise VlaBenchError(f"baseline file {path} does not exist")
    else:
        path = baseline_path(name_or_path, folder)
        if not path.is_file():
            present = list_baselines(folder)
            where = baselines_folder(folder)
            listing = f"baselines in {where}: {choices(present)}" if present else \
                f"no baselines in {where}; save one with --vla-save NAME"
            raise VlaBenchError(f"no baseline named {name_or_path!r}; {listing}")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise VlaBenchError(f"cannot read baseline {path}: {error}") from None
    return _from_json(data, path)


def _from_json(data: Any, path: Path) -> BaselineRun:
    if not isinstance(data, dict):
        raise VlaBenchError(f"{path}: a baseline file holds a JSON object")
    required = ("name", "suite", "protocol", "protocol_key", "checkpoint", "versions", "tasks")
    missing = [key for key in required if key not in data]
    if missing:
        raise VlaBenchError(f"{path}: missing keys {choices(missing)}")
    if data.get("format", FORMAT_VERSION) != FORMAT_VERSION:
        raise VlaBenchError(f"{path}: baseline format {data['format']} is not supported (this version reads "
                            f"{FORMAT_VERSION})")
    tasks = data["tasks"]
    if not isinstance(tasks, dict) or not tasks:
        raise VlaBenchError(f"{path}: 'tasks' must map task ids to episodes, and the run must not be empty")
    clean: dict[str, dict[int, bool]] = {}
    for task, episodes in tasks.items():
        if not isinstance(episodes, dict) or not episodes:
            raise VlaBenchError(f"{path}: tasks.{task} must map init-state indices to true/false and not be empty")
        try:
            clean[task] = {int(i): _boolean(s) for i, s in episodes.items()}
        except (TypeError, ValueError):
            raise VlaBenchError(f"{path}: tasks.{task}: keys must be init-state indices and values true/false") \
                from None
    return BaselineRun(
        name=str(data["name"]), suite=str(data["suite"]), protocol=dict(data["protocol"]),
        protocol_key=str(data["protocol_key"]), checkpoint=dict(data["checkpoint"]), versions=dict(data["versions"]),
        tasks=clean, created=str(data.get("created", "")),
    )


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(value)
    return value


def check_comparable(baseline: BaselineRun, candidate: BaselineRun) -> None:
    """Raise VlaBenchError naming every difference that makes `candidate` incomparable with `baseline`.

    Comparable means: the same suite; the same protocol in every field but the episode count; every candidate task
    present in the baseline; and every candidate init state run by the baseline too (so episodes pair up). The
    candidate may run fewer tasks or init states (e.g. `-k task1`, or fewer --episodes). Checkpoints and library
    versions may differ -- telling those apart is what the gate is for.
    """
    problems = []
    if baseline.suite != candidate.suite:
        problems.append(f"suite: baseline {baseline.suite!r}, candidate {candidate.suite!r}")
    for field in sorted(set(baseline.protocol) | set(candidate.protocol)):
        if field in NOT_COMPARED:
            continue
        ours, theirs = baseline.protocol.get(field, "<missing>"), candidate.protocol.get(field, "<missing>")
        if ours != theirs:
            problems.append(f"protocol {field}: baseline {ours!r}, candidate {theirs!r}")
    if not problems and baseline.protocol_key != candidate.protocol_key:
        problems.append(f"protocol key: baseline {baseline.protocol_key}, candidate {candidate.protocol_key}")
    missing_tasks = [task for task in candidate.tasks if task not in baseline.tasks]
    if missing_tasks:
        problems.append(f"tasks not in the baseline: {choices(missing_tasks)}")
    for task, episodes in candidate.tasks.items():
        if task in baseline.tasks:
            unpaired = sorted(set(episodes) - set(baseline.tasks[task]))
            if unpaired:
                shown = ", ".join(str(i) for i in unpaired[:10]) + (" ..." if len(unpaired) > 10 else "")
                problems.append(f"{task}: init states the baseline did not run: {shown}")
    if problems:
        raise VlaBenchError(f"runs {baseline.name!r} (baseline) and {candidate.name!r} (candidate) are not "
                            "comparable:\n  " + "\n  ".join(problems))


def task_pairs(baseline: BaselineRun, candidate: BaselineRun) -> list[tuple[TaskOutcomes, TaskOutcomes]]:
    """(baseline, candidate) outcomes of every candidate task, in the candidate's task order, for compare_suite;
    checks comparability first."""
    check_comparable(baseline, candidate)
    return [(baseline.outcomes(task), candidate.outcomes(task)) for task in candidate.tasks]
