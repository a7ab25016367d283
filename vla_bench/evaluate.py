"""Evaluate one (checkpoint, suite, task): resume from the store, run what is missing on the engine, commit each
episode as it finishes.

TaskRun is what the session (both `pytest suites/libero_*` and the CLI) hands the engine per task; it knows nothing
of pytest. Progress is reported through a callback so each front end shows it its own way.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Callable, Sequence

from .envs.tasks import suite_tasks
from .engine.episode import EpisodeOutcome
from .engine.pool import EnvSpec, WorkerPool
from .engine.scheduler import Job, Scheduler
from .metrics.episode_figures import TaskFigures, task_figures
from .metrics.intervals import wilson_interval
from .policies.base import Policy
from .policies.capabilities import capabilities_of
from .protocol import Protocol
from .registry import CheckpointSpec
from .results import EpisodeRecord, ResultsStore, library_versions
from .thresholds import Threshold
from .video import wants_video, video_path, write_video


@dataclasses.dataclass
class TaskResult:
    checkpoint: str
    suite: str
    task_index: int
    successes: int
    episodes: int  # measured episodes (errors excluded)
    errors: int
    mean_steps: float | None  # of successful episodes
    wall_s: float  # wall time of this evaluation
    threshold: Threshold | None = None
    resumed: int = 0  # episodes taken from the store instead of re-run
    planned: int | None = None  # the protocol's episodes; more than `episodes` when curtailment stopped early
    gate: object = None  # the TaskVerdict against a baseline, when gating
    #: 'init I: what differs' for each episode whose settled scene differs from the reference stack's
    scene_mismatches: list = dataclasses.field(default_factory=list)
    first_error: str | None = None  # the first errored episode's message (simulator or policy)
    #: what happened inside the episodes: mean action figures and failures by stop reason (metrics/episode_figures)
    episode_figures: TaskFigures | None = None

    @property
    def saved(self) -> int:
        """Episodes curtailment did not need to run."""
        return max(0, (self.planned or 0) - self.episodes - self.errors)

    def outcomes(self) -> dict[int, bool]:
        return dict(self._outcomes)

    _outcomes: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def rate(self) -> float:
        return self.successes / self.episodes if self.episodes else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.successes, self.episodes)

    @property
    def task_id(self) -> str:
        return f"task{self.task_index + 1}"

    @property
    def passed(self) -> bool | None:
        """Meets the threshold (Threshold.passes on the rate; after curtailment it agrees with the full run's
        verdict)."""
        if not self.episodes or self.threshold is None:
            return None
        return self.threshold.passes(self.successes / self.episodes)


def summarize(records: list[EpisodeRecord], checkpoint: str, suite: str, task_index: int,
              threshold=None, resumed: int = 0, wall_s: float | None = None) -> TaskResult:
    """The figures of one task; wall_s defaults to the episodes' summed wall time (what a store holds)."""
    measured = [r for r in records if r.error is None]
    wins = [r for r in measured if r.success]
    return TaskResult(checkpoint, suite, task_index, len(wins), len(measured), len(records) - len(measured),
                      sum(r.steps for r in wins) / len(wins) if wins else None,
                      sum(r.wall_s for r in records) if wall_s is None else wall_s, threshold, resumed,
                      scene_mismatches=[f"init {r.init_index}: {r.scene_check.partition(': ')[2]}" for r in records
                                        if (r.scene_check or "").startswith("mismatch")],
                      first_error=next((r.error for r in records if r.error is not None), None),
                      episode_figures=task_figures(measured),
                      _outcomes={r.init_index: r.success for r in measured})


def device_description(policy) -> str:
    """The device a policy really computes on, as a result row records it: 'cuda:0 NVIDIA H200' for a model on a
    GPU (index and name, since figures can differ between GPU models), 'cpu' for a model on the CPU and for policies
    without a `device` (the scripted expert and the controls compute with NumPy)."""
    device = getattr(policy, "device", None)
    if device is None:
        return "cpu"
    text = str(device)
    if text.startswith("cuda"):
        import torch

        index = torch.device(text).index
        index = torch.cuda.current_device() if index is None else index
        return f"cuda:{index} {torch.cuda.get_device_name(index)}"
    return text


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


@dataclasses.dataclass
class EvalSettings:
    workers: int = dataclasses.field(default_factory=default_workers)
    #: --vla-workers not given: the session may raise `workers` for a GPU model (see session.EvalSession.engine)
    workers_auto: bool = False
    video: str = "none"
    video_dir: Path = Path("videos")
    video_format: str = "mp4"
    device: str | None = None  # recorded with each row; None: the policy's own (`device_description`)
    #: lockstep slot groups: while one group's batch is on the GPU the others simulate (engine/scheduler.py)
    groups: int = 2
    #: one model replica per device (--vla-devices); empty: the checkpoint entry's own device
    devices: list = dataclasses.field(default_factory=list)
    engine_stats: Path | None = None  # where to write the engine's figures as JSON when the session closes
    trajectories: bool = False  # store each episode's per-step trajectory beside its row (--vla-trajectories)


class TaskRun:
    """One (checkpoint, suite, task) of a session: what the store already holds, the engine job for the episodes it
    lacks (each committed as it finishes), and the TaskResult once the job is done.

    policies: one replica per device (the engine spreads episodes over them). stop_when (curtailment): called with
    the measured outcomes {init index: success} after each episode; once it returns True no further episode starts
    (episodes in flight still finish and are kept)."""

    def __init__(self, policies: Sequence[Policy], spec: CheckpointSpec, identity: str, protocol: Protocol,
                 task_index: int, store: ResultsStore, settings: EvalSettings, threshold=None,
                 stop_when: Callable[[dict[int, bool]], bool] | None = None):
        self.policies = list(policies)
        self.spec, self.identity, self.protocol, self.task_index = spec, identity, protocol, task_index
        self.store, self.settings, self.threshold, self.stop_when = store, settings, threshold, stop_when
        self.task = suite_tasks(protocol.suite)[task_index]
        self.key = protocol.key()
        done = store.finished(identity, protocol.suite, task_index, self.key)
        wanted = range(protocol.episodes)
        self.records = {i: done[i] for i in wanted if i in done}
        self.resumed = len(self.records)
        #: called (outcome, episodes done, planned) after each committed episode: a front end's progress view
        self.progress: Callable[[EpisodeOutcome, int, int], None] | None = None
        self._first_start: float | None = None
        self._last_end: float | None = None
        todo = [i for i in wanted if i not in done]
        if stop_when and stop_when(self._measured()):
            todo = []
        capabilities = capabilities_of(self.policies[0])
        record_frames = settings.video != "none"
        cameras = capabilities.cameras_to_render(record_frames)
        # plus what the policy says identifies it beyond its identity string (a remote server's metadata)
        self.versions = {**library_versions(), **getattr(self.policies[0], "row_versions", {})}
        self.devices = [settings.device or device_description(p) for p in self.policies]
        self.job = Job(f"{spec.name} {protocol.suite} {self.task.task_id}", self.policies,
                       EnvSpec(protocol, task_index, cameras, capabilities.privileged), self.task.language, todo,
                       lambda i: protocol.episode_seed(task_index, i), self._on_done, record_frames, capabilities,
                       settings.trajectories)

    def _measured(self) -> dict[int, bool]:
        return {i: r.success for i, r in self.records.items() if r.error is None}

    def _on_done(self, outcome: EpisodeOutcome) -> bool:
        now = time.perf_counter()
        self._first_start = min(self._first_start or now, now - outcome.wall_s)
        self._last_end = now
        video = None
        if outcome.frames and wants_video(self.settings.video, outcome.success):
            label = "error" if outcome.error else ("success" if outcome.success else "failure")
            video = str(write_video(video_path(self.settings.video_dir, self.spec.name, self.protocol.suite,
                                               self.task.task_id, outcome.init_index, label,
                                               self.settings.video_format),
                                    outcome.frames, self.settings.video_format))
        replica = outcome.replica
        record = EpisodeRecord(self.spec.name, self.identity, self.protocol.suite, self.task_index, self.task.name,
                               outcome.init_index, outcome.seed, self.key, self.protocol.as_dict(), outcome.success,
                               outcome.steps, outcome.error, outcome.wall_s, self.versions,
                               outcome.renderer or "unknown (the episode ended before its reset answered)",
                               self.devices[replica], video, scene_check=outcome.scene_check,
                               workers=self.settings.workers, replica=replica,
                               **(dataclasses.asdict(outcome.summary) if outcome.summary else {}))
        self.store.add(record, trajectory=outcome.trajectory)
        self.records[outcome.init_index] = record
        if self.progress:
            self.progress(outcome, len(self.records), self.protocol.episodes)
        return bool(self.stop_when and self.stop_when(self._measured()))

    def result(self) -> TaskResult:
        wall = (self._last_end - self._first_start) if self._first_start is not None else 0.0
        result = summarize([self.records[i] for i in sorted(self.records)], self.spec.name, self.protocol.suite,
                           self.task_index, self.threshold, self.resumed, wall_s=wall)
        result.planned = self.protocol.episodes
        return result


def evaluate_task(policy: Policy, spec: CheckpointSpec, identity: str, protocol: Protocol, task_index: int,
                  store: ResultsStore, settings: EvalSettings,
                  progress: Callable[[EpisodeOutcome, int, int], None] | None = None,
                  threshold=None, stop_when: Callable[[dict[int, bool]], bool] | None = None, pool=None
                  ) -> TaskResult:
    """One task on its own worker pool (or on `pool`): the session runs many TaskRuns on one engine instead."""
    run = TaskRun([policy], spec, identity, protocol, task_index, store, settings, threshold, stop_when)
    run.progress = progress
    if run.job.todo:
        own = pool is None
        pool = pool or WorkerPool(min(settings.workers, len(run.job.todo)))
        scheduler = Scheduler(pool, settings.groups)
        scheduler.add(run.job)
        try:
            scheduler.run()
        finally:
            scheduler.close()
            if own:
                pool.close()
    return run.result()
