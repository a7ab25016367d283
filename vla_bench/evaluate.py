"""Evaluate one (checkpoint, suite, task): resume from the store, roll out what is missing, commit each episode.

This is the function behind both `pytest suites/libero_*` and the CLI; it knows nothing of pytest. Progress is
reported through a callback so each front end shows it its own way.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Callable

from .envs.tasks import suite_tasks
from .envs.vector import VectorLiberoEnv
from .metrics.episode_figures import TaskFigures, task_figures
from .metrics.intervals import wilson_interval
from .policies.base import Policy
from .policies.capabilities import capabilities_of
from .protocol import Protocol
from .registry import CheckpointSpec
from .results import EpisodeRecord, ResultsStore, library_versions
from .thresholds import Threshold
from .rollout import EpisodeOutcome, rollout_episodes, rollout_in_workers
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
    video: str = "none"
    video_dir: Path = Path("videos")
    video_format: str = "mp4"
    device: str | None = None  # recorded with each row; None: the policy's own (`device_description`)
    trajectories: bool = False  # store each episode's per-step trajectory beside its row (--vla-trajectories)


def evaluate_task(policy: Policy, spec: CheckpointSpec, identity: str, protocol: Protocol, task_index: int,
                  store: ResultsStore, settings: EvalSettings,
                  progress: Callable[[EpisodeOutcome, int, int], None] | None = None,
                  threshold=None, stop_when: Callable[[dict[int, bool]], bool] | None = None) -> TaskResult:
    """Run the protocol's episodes of one task that the store lacks, committing each as it finishes.

    stop_when (curtailment): called with the measured outcomes {init index: success} after each episode; once it
    returns True no further episode starts (episodes in flight still finish and are kept)."""
    started = time.perf_counter()
    task = suite_tasks(protocol.suite)[task_index]
    key = protocol.key()
    done = store.finished(identity, protocol.suite, task_index, key)
    wanted = range(protocol.episodes)
    todo = [i for i in wanted if i not in done]
    records = {i: done[i] for i in wanted if i in done}
    resumed = len(records)

    def measured() -> dict[int, bool]:
        return {i: r.success for i, r in records.items() if r.error is None}

    if todo and not (stop_when and stop_when(measured())):
        record_frames = settings.video != "none"
        capabilities = capabilities_of(policy)
        # cameras cost ~0.2 s per step each on a CPU: render only what the policy or the video needs
        cameras = capabilities.rendered_cameras
        if record_frames and "agentview" not in cameras:
            cameras += ("agentview",)
        # plus what the policy says identifies it beyond its identity string (a remote server's metadata)
        versions = {**library_versions(), **getattr(policy, "row_versions", {})}
        device = settings.device or device_description(policy)
        # cheap CPU policies (scripted expert, controls) run whole episodes inside the workers
        in_workers = capabilities.in_worker
        with VectorLiberoEnv(protocol, task_index, min(settings.workers, len(todo)), cameras,
                             capabilities.privileged, local_policy=policy if in_workers else None,
                             observation_transform=capabilities.frame_transform) as env:
            def on_done(outcome: EpisodeOutcome) -> bool:
                video = None
                if outcome.frames and wants_video(settings.video, outcome.success):
                    label = "error" if outcome.error else ("success" if outcome.success else "failure")
                    video = str(write_video(video_path(settings.video_dir, spec.name, protocol.suite,
                                                       task.task_id, outcome.init_index, label,
                                                       settings.video_format),
                                            outcome.frames, settings.video_format))
                record = EpisodeRecord(spec.name, identity, protocol.suite, task_index, task.name,
                                       outcome.init_index, outcome.seed, key, protocol.as_dict(), outcome.success,
                                       outcome.steps, outcome.error, outcome.wall_s, versions, env.backend,
                                       device, video, scene_check=outcome.scene_check)
                store.add(record)
                records[outcome.init_index] = record
                if progress:
                    progress(outcome, len(records), protocol.episodes)
                return bool(stop_when and stop_when(measured()))

            if in_workers:
                rollout_in_workers(env, protocol, task_index, task.language, todo, on_done, record_frames)
            else:
                rollout_episodes(policy, env, protocol, task_index, task.language, todo, on_done, record_frames)
    result = summarize([records[i] for i in sorted(records)], spec.name, protocol.suite, task_index, threshold,
                       resumed, wall_s=time.perf_counter() - started)
    result.planned = protocol.episodes
    return result
