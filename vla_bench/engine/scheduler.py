"""The session's one scheduler: the episodes of every job on one worker pool, the GPU kept busy.

A job is the episodes of one (checkpoint, suite, task) still to run and what to do with each outcome (evaluate.py
commits it to the store). The slots are spread over all jobs at once and a slot keeps its task while that task
has episodes: a worker switching task builds a new env, which cost 20-70 s of every 220-step wave on the GPU host
when all slots moved from one task to the next together (measured: 32 workers, 2 tasks). A freed slot takes the
job with the most episodes left per slot serving it (ties: the job added first). Tasks therefore finish close
together, near the end of the session; each test still reports its own task when it completes.

Episodes of policies that run in the main process (models) advance in lockstep *groups* of slots: slot s belongs to
group s % groups. While one group's batch is inside `policy.act` (on the GPU), the other groups' workers simulate
their last actions, so the GPU does not wait for the simulator and the simulator does not wait for the GPU. A group
acts as soon as all its stepping slots have answered; slots still resetting join its next batch. Within a group,
slots of different checkpoints are batched per policy object (one `act` per policy; checkpoints that share a base
model share its weights through the model cache). Episodes of in-worker policies (the scripted expert, the
controls) run whole inside their worker and only their outcome comes back.

Episode outcomes do not depend on scheduling: every episode's reset seed, init state and policy state are its own.
"""
from __future__ import annotations

import collections
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np

from ..policies.base import SlotErrors
from ..policies.capabilities import Capabilities, capabilities_of
from .episode import Episode, EpisodeOutcome, EpisodeRequest, last_phase
from .pool import Answer, EnvSpec


def replica_of(slot: int, groups: int, replicas: int) -> int:
    """The policy replica (device) that acts for `slot`. Slot s belongs to lockstep group s % groups, so the replica
    follows s // groups: every group's batch is spread evenly over the replicas and they compute at once (by
    s % replicas, two groups and two replicas would give each group one device, and the devices would take turns).
    A slot keeps its replica, whose per-slot state (the episode's reset) lives there."""
    return (slot // groups) % replicas


@dataclasses.dataclass(eq=False)
class Job:
    """The episodes of one (checkpoint, suite, task) to run. `policies`: one replica per device (episodes are spread
    over them by slot); `on_done(outcome)` returns True to stop starting this job's episodes (curtailment); the
    episodes in flight still finish and are reported."""
    name: str
    policies: Sequence
    spec: EnvSpec
    instruction: str
    init_indices: Sequence[int]
    seed_of: Callable[[int], int]
    on_done: Callable[[EpisodeOutcome], bool | None]
    record_frames: bool = False
    capabilities: Capabilities = None
    trajectories: bool = False  # keep each episode's per-step trajectory

    def __post_init__(self):
        self.policies = list(self.policies)
        if self.capabilities is None:
            self.capabilities = capabilities_of(self.policies[0])
        self.todo = collections.deque(self.init_indices)
        self.running = 0
        self.stopped = False

    @property
    def can_start(self) -> bool:
        return bool(self.todo) and not self.stopped

    @property
    def finished(self) -> bool:
        return not self.can_start and self.running == 0

    def policy_for(self, slot: int, groups: int):
        return self.policies[replica_of(slot, groups, len(self.policies))]

    @property
    def transform_key(self):
        t = self.capabilities.frame_transform
        return None if t is None else ("transform", id(t))


@dataclasses.dataclass
class EngineStats:
    """What the live view and the benchmark read: throughput and how busy the policy (the GPU) was."""
    wall_s: float = 0.0  # time inside Scheduler.run
    policy_s: float = 0.0  # time inside policy.act (the GPU's busy time for a model policy)
    episodes: int = 0
    actions: int = 0  # executed control steps, lockstep and in-worker
    batches: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # act() sizes
    prepare_s: float = 0.0  # warm-up before the first episodes (graph captures), not part of wall_s
    wait_s: float = 0.0  # time blocked waiting for simulator answers with no batch ready (the policy idle)
    # where the simulators' time went, from the workers' step timings (pool.StepTiming)
    steps_timed: int = 0
    sim_s: float = 0.0  # workers' time on their steps, summed
    render_s: float = 0.0  # of which camera renders
    transform_s: float = 0.0  # of which frame transforms
    spans: int = 0  # lockstep groups whose every step has come back
    span_s: float = 0.0  # summed: from a group's actions leaving to its last simulator finishing
    lag_s: float = 0.0  # summed: from a worker finishing a step to the loop reading its answer

    @property
    def busy(self) -> float:
        return self.policy_s / self.wall_s if self.wall_s else 0.0

    @property
    def sim_wait(self) -> float:
        """The share of wall time the loop waited for the simulators; 1 - busy - sim_wait is the loop's own work."""
        return self.wait_s / self.wall_s if self.wall_s else 0.0

    def step_timing(self) -> dict:
        """Per simulator step (ms): the worker's time, its renders and frame transform, and how late the loop read
        it; per lockstep group (ms): how long its simulators took to answer every slot. Compared with the policy's
        time per batch this tells whether the simulators or the loop keep the GPU waiting."""
        if not self.steps_timed:
            return {}
        per_step = lambda total: round(1000 * total / self.steps_timed, 2)  # noqa: E731
        return {"steps_timed": self.steps_timed, "sim_ms": per_step(self.sim_s), "render_ms": per_step(self.render_s),
                "transform_ms": per_step(self.transform_s), "answer_lag_ms": per_step(self.lag_s),
                "group_span_ms": round(1000 * self.span_s / self.spans, 2) if self.spans else None,
                "policy_ms_per_batch": round(1000 * self.policy_s / sum(self.batches.values()), 2)
                if self.batches else None}

    def as_dict(self) -> dict:
        return {"wall_s": round(self.wall_s, 3), "prepare_s": round(self.prepare_s, 3),
                "policy_s": round(self.policy_s, 3), "gpu_busy": round(self.busy, 4),
                "wait_s": round(self.wait_s, 3), "sim_wait": round(self.sim_wait, 4),
                "episodes": self.episodes, "actions": self.actions,
                "actions_per_s": round(self.actions / self.wall_s, 2) if self.wall_s else 0.0,
                "batches": {str(k): v for k, v in sorted(self.batches.items())},
                "step_timing": self.step_timing()}


class Scheduler:
    def __init__(self, pool, groups: int = 2, on_episode: Callable | None = None):
        self.pool = pool
        self.groups = max(1, min(groups, pool.n))
        self.jobs: list[Job] = []
        self.on_episode = on_episode  # called (job, outcome) after the job's own on_done: the live view
        self.stats = EngineStats()
        self._job_of: dict[int, Job] = {}  # slot -> job of its running episode
        self._episode: dict[int, Episode | EpisodeRequest] = {}
        self._resetting: set[int] = set()
        self._stepping: set[int] = set()
        self._waiting: set[int] = set()  # lockstep slots with an observation, waiting for their action
        self._env_of: dict[int, EnvSpec] = {}
        self._next_group = 0
        self._threads = None
        self._since = None
        self._prepared: dict[int, tuple] = {}  # id(policy) -> (batch, instructions) it has been prepared for
        self._span: dict[int, list] = {}  # group -> [monotonic time its actions left, steps out, latest finish]

    def add(self, job: Job) -> Job:
        self.jobs.append(job)
        return job

    # ---- the loop -------------------------------------------------------------------------------------------
    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Advance every job until `until()` holds (default: all jobs finished)."""
        until = until or (lambda: all(j.finished for j in self.jobs))
        # the first resets go out before the policies warm up: the workers build their envs (seconds each) while
        # the GPU captures its graphs
        self._fill()
        self._prepare()
        started = self._since = time.perf_counter()
        wall_before = self.stats.wall_s
        try:
            while not until():
                self._fill()
                group = self._ready_group()
                if group is not None:
                    self._act(group)
                    continue
                if not self.pool.busy:
                    break  # nothing running and nothing to start
                waited = time.perf_counter()
                answers = self.pool.wait()
                self.stats.wait_s += time.perf_counter() - waited
                for slot, answer in answers.items():
                    self._answer(slot, answer)
        finally:
            self.stats.wall_s = wall_before + time.perf_counter() - started
            self._since = None

    def _prepare(self) -> None:
        """Before the first episode: let each model policy build what its batches will need (OpenVLA: the CUDA
        graphs of every batch bucket up to the largest batch a group can form, for its jobs' instructions), so no
        capture happens mid-run. Timed apart from the run (stats.prepare_s)."""
        started = time.perf_counter()
        wanted: dict[int, tuple] = {}  # id(policy) -> (policy, largest batch, instructions)
        for job in self.jobs:
            if job.capabilities.in_worker or job.finished:
                continue
            for r, policy in enumerate(job.policies):
                prepare = getattr(policy, "prepare", None)  # optional: policies with nothing to warm up lack it
                if prepare is None:
                    continue
                largest = max(sum(1 for s in range(self.pool.n) if s % self.groups == g
                                  and replica_of(s, self.groups, len(job.policies)) == r)
                              for g in range(self.groups))
                _, batch, texts = wanted.get(id(policy), (policy, 0, set()))
                wanted[id(policy)] = (policy, max(batch, largest), texts | {job.instruction})
        for key, (policy, batch, texts) in wanted.items():
            if self._prepared.get(key, (0, set()))[0] >= batch and texts <= self._prepared[key][1]:
                continue
            policy.prepare(max(1, batch), sorted(texts))
            self._prepared[key] = (batch, texts)
        self.stats.prepare_s += time.perf_counter() - started

    def _fill(self) -> None:
        for slot in range(self.pool.n):
            if slot in self._job_of:
                continue
            job = self._pick(slot)
            if job is None:
                return
            self._start(slot, job)

    def _pick(self, slot: int) -> Job | None:
        startable = [j for j in self.jobs if j.can_start]
        if not startable:
            return None
        same_env = [j for j in startable if j.spec == self._env_of.get(slot)]
        if same_env:
            return same_env[0]
        serving = collections.Counter(id(j) for j in self._job_of.values())
        return max(startable, key=lambda j: len(j.todo) / (serving[id(j)] + 1))  # max keeps the first of ties

    def _start(self, slot: int, job: Job) -> None:
        init_index = job.todo.popleft()
        request = EpisodeRequest(init_index, job.seed_of(init_index), job.instruction, job.spec.protocol.max_steps,
                                 job.record_frames, trajectory=job.trajectories)
        job.running += 1
        self._job_of[slot] = job
        self._env_of[slot] = job.spec
        transform = job.capabilities.frame_transform
        self.pool.keep(slot, job.transform_key, transform)
        if job.capabilities.in_worker:
            policy = job.policy_for(slot, self.groups)
            key = ("policy", id(policy))
            self.pool.keep(slot, key, policy)
            self._episode[slot] = request
            self.pool.submit(slot, "episode", job.spec, key, job.transform_key, request)
        else:
            policy = job.policy_for(slot, self.groups)
            policy.reset(slot, request.seed)
            self._episode[slot] = Episode(request, lambda: last_phase(policy, slot))
            self._resetting.add(slot)
            self.pool.submit(slot, "reset", job.spec, job.transform_key, init_index, request.seed)

    def _answer(self, slot: int, answer: Answer) -> None:
        episode = self._episode[slot]
        if isinstance(episode, EpisodeRequest):  # a whole in-worker episode
            outcome = answer.episode
            if answer.error is not None or outcome is None:
                outcome = EpisodeOutcome(episode.init_index, episode.seed, False, 0, answer.error, 0.0)
            self.stats.actions += outcome.steps
            self._finish(slot, outcome)
        elif slot in self._resetting:
            self._resetting.discard(slot)
            if answer.error is not None:  # the episode could not even start: record it, the slot takes the next
                self._finish(slot, episode.end(False, answer.error))
            else:
                episode.begin(answer.obs, answer.scene_check, renderer=answer.renderer)
                self._waiting.add(slot)
        else:
            self._stepping.discard(slot)
            self._timed(slot, answer)
            if episode.advance(answer.obs, answer.done, answer.error):
                self._finish(slot, episode.outcome)
            else:
                self._waiting.add(slot)

    def _finish(self, slot: int, outcome: EpisodeOutcome) -> None:
        job = self._job_of.pop(slot)
        outcome.slot, outcome.replica = slot, replica_of(slot, self.groups, len(job.policies))
        self._episode.pop(slot)
        self._waiting.discard(slot)
        job.running -= 1
        self.stats.episodes += 1
        if self._since is not None:  # keep wall_s current for the live view
            now = time.perf_counter()
            self.stats.wall_s += now - self._since
            self._since = now
        if job.on_done(outcome):
            job.stopped = True
        if self.on_episode is not None:
            self.on_episode(job, outcome)

    def _timed(self, slot: int, answer: Answer) -> None:
        """Count one step answer into the simulator timings and its group's span."""
        span = self._span.get(slot % self.groups)
        latest = span[2] if span else 0.0
        timing = answer.timing
        if timing is not None:
            self.stats.steps_timed += 1
            self.stats.sim_s += timing.finished - timing.started
            self.stats.render_s += timing.render_s
            self.stats.transform_s += timing.transform_s
            self.stats.lag_s += max(0.0, time.monotonic() - timing.finished)
            latest = max(latest, timing.finished)
        if span:
            span[1] -= 1
            span[2] = latest
            if span[1] == 0:
                del self._span[slot % self.groups]
                if latest:
                    self.stats.spans += 1
                    self.stats.span_s += latest - span[0]

    # ---- acting ---------------------------------------------------------------------------------------------
    def _ready_group(self) -> int | None:
        """The next group (round robin) whose stepping slots have all answered and that has slots to act for."""
        for k in range(self.groups):
            g = (self._next_group + k) % self.groups
            if any(s % self.groups == g for s in self._stepping):
                continue
            if any(s % self.groups == g for s in self._waiting):
                self._next_group = (g + 1) % self.groups
                return g
        return None

    def _act(self, group: int) -> None:
        slots = sorted(s for s in self._waiting if s % self.groups == group)
        self._waiting.difference_update(slots)
        calls: dict[int, tuple] = {}  # id(policy) -> (policy, slots)
        for slot in slots:
            policy = self._job_of[slot].policy_for(slot, self.groups)
            calls.setdefault(id(policy), (policy, []))[1].append(slot)
        started = time.perf_counter()
        if len(calls) > 1 and self._replicas():  # replicas on several devices compute at once
            results = list(self._pool_threads().map(lambda c: self._call(*c), calls.values()))
        else:
            results = [self._call(*c) for c in calls.values()]
        self.stats.policy_s += time.perf_counter() - started
        span = [time.monotonic(), 0, 0.0]
        for planned, failed in results:
            for slot, message in failed.items():
                self._finish(slot, self._episode[slot].end(False, message))
            for slot, action in planned.items():
                episode = self._episode[slot]
                if episode.check(action):
                    self._stepping.add(slot)
                    span[1] += 1
                    self.stats.actions += 1
                    self.pool.submit(slot, "step", self._job_of[slot].spec, self._job_of[slot].transform_key,
                                     episode.executed(action))
                else:
                    self._finish(slot, episode.outcome)
        if span[1]:
            self._span[group] = span

    def _call(self, policy, slots: list[int]) -> tuple[dict, dict]:
        """One policy's batch: ({slot: action}, {slot: error message})."""
        observations = [self._episode[s].obs for s in slots]
        instructions = [self._job_of[s].instruction for s in slots]
        self.stats.batches[len(slots)] += 1
        try:
            actions = np.asarray(policy.act(observations, instructions, slots))
        except SlotErrors as e:  # e.g. a remote server lost mid-episode: those episodes are errors, not failures
            return {s: a for s, a in e.actions.items() if s not in e.errors}, dict(e.errors)
        if actions.shape != (len(slots), 7):  # no row can be trusted to belong to its slot
            return {}, {s: f"policy returned actions of shape {actions.shape} at step {self._episode[s].steps + 1} "
                           f"for {len(slots)} environments, expected ({len(slots)}, 7)" for s in slots}
        return {s: actions[k] for k, s in enumerate(slots)}, {}

    def _replicas(self) -> bool:
        return any(len(j.policies) > 1 for j in self.jobs)

    def _pool_threads(self) -> ThreadPoolExecutor:
        if self._threads is None:
            self._threads = ThreadPoolExecutor(max(len(j.policies) for j in self.jobs))
        return self._threads

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown()


def run_episodes(policy, pool, protocol, task_index: int, instruction: str, init_indices: Sequence[int],
                 on_done: Callable[[EpisodeOutcome], bool | None], record_frames: bool = False,
                 groups: int = 1) -> EngineStats:
    """One task's episodes on `pool` (a convenience over Scheduler for one job; the session uses Scheduler)."""
    capabilities = capabilities_of(policy)
    spec = EnvSpec(protocol, task_index, capabilities.cameras_to_render(record_frames), capabilities.privileged)
    scheduler = Scheduler(pool, groups)
    scheduler.add(Job(f"{protocol.suite} task{task_index + 1}", [policy], spec, instruction, init_indices,
                      lambda i: protocol.episode_seed(task_index, i), on_done, record_frames, capabilities))
    try:
        scheduler.run()
    finally:
        scheduler.close()
    return scheduler.stats
