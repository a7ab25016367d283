"""The pool behind `vla-bench collect`: attempts dispatched to worker processes in order, results written in order.

Determinism and resume: attempts are dispatched in order and written in attempt order whatever worker finishes
first, failures are recorded in the file (data.attrs["vla_bench_failed_seeds"]), and a task stops at the first
prefix of attempts that holds `n_demos` successes. A killed run that is started again skips the seeds already in
the file and continues the same sequence, so it ends with the same demos as a run that was never killed.

Workers: the engine's pool (engine/pool.py), one process per core, each running a whole episode with the engine's
episode loop (engine/episode.py, recording the demo) and sending back the finished demo, so nothing crosses a pipe
per step. The expert is built through the registry in
the calling process and pickled to the workers: the scripted expert is plain NumPy, and torch must stay out of the
workers (importing robosuite before torchvision segfaults in the reference stack).
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.libero_hdf5 import append_libero_demo
from ..errors import VlaBenchError, choices
from ..policies.capabilities import capabilities_of
from ..protocol import Protocol, reference_protocol
from ..suites import CLOSED_LOOP, get_suite
from .episode import CAMERAS, DEFAULT_CAMERAS
from .writer import open_task_file, record_failure, task_file

DEFAULT_EXPERT = "expert"


def demo_seed(seed: int, task_index: int, attempt: int) -> int:
    """The seed of attempt `attempt` of task `task_index` (0-based): a hash of all three (SeedSequence), so the
    streams of different tasks and base seeds do not overlap, within np.random.seed's range."""
    return int(np.random.SeedSequence([seed, task_index, attempt]).generate_state(1, np.uint32)[0])


# ---- summary ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TaskSummary:
    task_id: str
    language: str
    path: Path
    kept: int = 0  # demos in the file at the end (resumed + new)
    resumed: int = 0  # demos that were already in the file
    failed: int = 0  # failed attempts (in the file's record, resumed ones included)
    errors: int = 0  # attempts that raised or whose worker died (not recorded: a later run retries them)
    steps: list[int] = dataclasses.field(default_factory=list)  # steps of the demos written by this run
    first_error: str | None = None  # the traceback of the first error, to show the user

    @property
    def new(self) -> int:
        return self.kept - self.resumed


@dataclasses.dataclass
class CollectSummary:
    suite: str
    n_demos: int
    tasks: list[TaskSummary]
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        """Every task reached n_demos."""
        return all(t.kept >= self.n_demos for t in self.tasks)

    @property
    def kept(self) -> int:
        return sum(t.kept for t in self.tasks)

    @property
    def failed(self) -> int:
        return sum(t.failed for t in self.tasks)

    def as_dict(self) -> dict:
        return {"suite": self.suite, "n_demos": self.n_demos, "seconds": self.seconds, "complete": self.complete,
                "tasks": [{**dataclasses.asdict(t), "path": str(t.path)} for t in self.tasks]}


# ---- the calling side ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Task:
    index: int
    summary: TaskSummary
    done_seeds: set  # seeds already resolved in the file (kept or failed)
    next_attempt: int = 0  # the next attempt to dispatch
    next_write: int = 0  # the next attempt to write (results are written in attempt order)
    in_flight: set = dataclasses.field(default_factory=set)
    buffered: dict = dataclasses.field(default_factory=dict)  # attempt -> result waiting for earlier attempts
    stopped: bool = False  # reached max_attempts
    bar: int | None = None  # the rich progress task id

def collect(suite: str, tasks: Sequence[int], n_demos: int, out_dir: str | os.PathLike, workers: int | None = None,
            seed: int = 0, progress=None, *, expert: str = DEFAULT_EXPERT,
            checkpoints_file: str | os.PathLike | None = None, max_steps: int | None = None,
            camera_size: int = 256, cameras: Sequence[str] = DEFAULT_CAMERAS, max_attempts: int | None = None,
            policy=None, action_noise: float = 0.0) -> CollectSummary:
    """Collect `n_demos` successful expert demos for each task (LIBERO 0-based indices) of `suite` into
    `out_dir/<suite>/`.

    `progress`: a rich.progress.Progress to add one bar per task to (None: silent). `expert`: the checkpoints.toml
    entry that acts (the scripted expert by default); `policy` overrides it with a picklable Policy object.
    `cameras`: LIBERO camera names to record (default agentview and the wrist camera, as LIBERO stores them; ()
    records actions and states only, ~5x faster on a CPU, enough for norm stats or state-based experts).
    `max_attempts` per task (default 2 * n_demos + 10) bounds the work on a task the expert cannot do.
    `action_noise`: sigma of the noise added to the executed arm actions (module docstring; 0: none)."""
    from ..envs.tasks import suite_tasks

    get_suite(suite, CLOSED_LOOP)
    if n_demos < 1:
        raise VlaBenchError(f"--demos must be at least 1, got {n_demos}")
    if not 0.0 <= action_noise <= 1.0:
        raise VlaBenchError(f"--action-noise must be between 0 and 1 (the action range is [-1, 1]), got {action_noise}")
    if camera_size < 1:
        raise VlaBenchError(f"camera size must be at least 1, got {camera_size}")
    infos = suite_tasks(suite)
    if not tasks:
        raise VlaBenchError(f"no tasks given; valid tasks of {suite}: 1 ... {len(infos)}")
    for t in tasks:
        if not 0 <= t < len(infos):
            raise VlaBenchError(f"unknown task {t + 1} in {suite}; valid tasks: 1 ... {len(infos)}")
    max_attempts = 2 * n_demos + 10 if max_attempts is None else max_attempts
    protocol = dataclasses.replace(reference_protocol(suite, max_steps=max_steps), camera_size=camera_size)
    if policy is None:
        policy = _build_expert(suite, expert, checkpoints_file)
    known = [name for name, _, _ in CAMERAS]
    cameras = tuple(cameras)
    if any(c not in known for c in cameras):
        raise VlaBenchError(f"unknown camera(s) {choices(c for c in cameras if c not in known)}; "
                            f"valid: {choices(known)}")
    env_args = {"env_name": "ControlEnv", "collector": "vla-bench collect", "expert": expert,
                "seed": seed, "action_noise": action_noise, "protocol": protocol.as_dict(),
                "env_kwargs": {"camera_names": list(cameras), "camera_heights": camera_size,
                               "camera_widths": camera_size, "control_freq": 20}}

    started = time.monotonic()
    states: dict[int, _Task] = {}
    for t in dict.fromkeys(tasks):  # keep order, drop repeats
        info = infos[t]
        path = task_file(out_dir, suite, info.name)
        count, kept, failed = open_task_file(path, info, suite, {**env_args, "bddl_file": info.bddl_path},
                                              action_noise)
        summary = TaskSummary(info.task_id, info.language, path, kept=count, resumed=count, failed=len(failed))
        states[t] = _Task(t, summary, kept | failed)
        if progress is not None:
            states[t].bar = progress.add_task(f"{suite} {info.task_id}", total=n_demos,
                                              completed=min(count, n_demos))

    def seed_of(task: _Task, attempt: int) -> int:
        return demo_seed(seed, task.index, attempt)

    def skip_resolved(task: _Task) -> None:
        while seed_of(task, task.next_attempt) in task.done_seeds:
            task.next_attempt += 1

    def needs_work(task: _Task) -> bool:
        if task.stopped:
            return False
        skip_resolved(task)
        pending_success = sum(1 for r in task.buffered.values() if r.get("success"))
        if task.summary.kept + pending_success + len(task.in_flight) >= n_demos:
            return False
        if task.next_attempt >= max_attempts:
            task.stopped = True
            return False
        return True

    def flush(task: _Task) -> None:
        """Write the buffered results whose earlier attempts are all resolved, in attempt order."""
        while True:
            s = seed_of(task, task.next_write)
            if s in task.done_seeds and task.next_write not in task.buffered:
                task.next_write += 1
                continue
            if task.next_write not in task.buffered:
                return
            result = task.buffered.pop(task.next_write)
            task.next_write += 1
            if "error" in result:
                task.summary.errors += 1
                task.summary.first_error = task.summary.first_error or result["error"]
            elif result["success"] and task.summary.kept < n_demos:
                append_libero_demo(task.summary.path, result["episode"])
                task.summary.kept += 1
                task.summary.steps.append(len(result["episode"]["actions"]))
            elif not result["success"]:
                record_failure(task.summary.path, s)
                task.summary.failed += 1
            task.done_seeds.add(s)
            if progress is not None:
                progress.update(task.bar, completed=min(task.summary.kept, n_demos),
                                description=f"{suite} {task.summary.task_id} ({task.summary.failed} failed)")

    todo = [t for t in states.values() if needs_work(t)]
    from ..engine.sizing import auto_workers

    n_workers = max(1, min(workers or auto_workers(os.cpu_count() or 1),
                           sum(n_demos - t.summary.kept for t in todo) or 1))
    if todo:
        _run_workers(states, n_workers, protocol, cameras, policy, infos, needs_work, seed_of, flush, action_noise)
    summary = CollectSummary(suite, n_demos, [t.summary for t in states.values()], time.monotonic() - started)
    return summary


def _run_workers(states: dict, n_workers: int, protocol: Protocol, cameras: tuple, policy, infos, needs_work,
                 seed_of, flush, action_noise: float = 0.0) -> None:
    """Whole demo episodes on the engine's worker pool (engine/pool.py), each worker with its own copy of the
    expert; results are handed to `flush` per task, which writes them in attempt order."""
    from ..engine.episode import EpisodeRequest
    from ..engine.pool import EnvSpec, WorkerPool

    privileged = capabilities_of(policy).privileged
    busy: dict[int, tuple[int, int]] = {}  # slot -> (task, attempt)
    last_task: dict[int, int] = {}

    with WorkerPool(n_workers) as pool:
        def dispatch(slot: int) -> bool:
            # stay on the slot's current task while it needs demos (an env rebuild costs seconds), else the first
            order = sorted(states.values(), key=lambda t: (t.index != last_task.get(slot), list(states).index(t.index)))
            for task in order:
                if needs_work(task):
                    attempt = task.next_attempt
                    task.next_attempt += 1
                    task.in_flight.add(attempt)
                    request = EpisodeRequest(None, seed_of(task, attempt), infos[task.index].language,
                                             protocol.max_steps, demo=True, action_noise=action_noise)
                    pool.keep(slot, "expert", policy)
                    pool.submit(slot, "episode", EnvSpec(protocol, task.index, cameras, privileged), "expert", None,
                                request)
                    busy[slot] = (task.index, attempt)
                    last_task[slot] = task.index
                    return True
            return False

        for slot in range(n_workers):
            if not dispatch(slot):
                break
        while busy:
            for slot, answer in pool.wait().items():
                task_index, attempt = busy.pop(slot)
                task = states[task_index]
                outcome = answer.episode
                if answer.error is not None or outcome is None or outcome.error is not None:
                    error = answer.error or (outcome.error if outcome is not None else "no answer")
                    result = {"success": False, "error": error}
                    last_task.pop(slot, None)
                else:
                    result = {"success": outcome.success, "episode": outcome.demo}
                task.in_flight.discard(attempt)
                task.buffered[attempt] = result
                flush(task)
                dispatch(slot)


def _build_expert(suite: str, name: str, checkpoints_file):
    from ..policies import BuildContext, ModelCache, build_policy
    from ..registry import Registry

    registry = Registry.load(checkpoints_file)
    policy = build_policy(registry.get(name), BuildContext(registry, suite, ModelCache()))
    if capabilities_of(policy).images:
        raise VlaBenchError(f"checkpoint {name!r} needs camera images to act; collect runs experts that read the "
                            "simulator state only (kind = \"scripted\")")
    return policy
