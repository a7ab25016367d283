"""The session scheduler (engine/scheduler.py) on a stand-in simulator: outcomes do not depend on scheduling, jobs
of several tasks and checkpoints interleave into the rows they give one by one, groups overlap, and a stopped job
starts nothing more."""
import hashlib
import time

import numpy as np
from hypothesis import given, settings, strategies as st

from tests.fake_pool import FakePool
from vla_bench.engine.pool import Answer, EnvSpec, StepTiming
from vla_bench.engine.scheduler import Job, Scheduler
from vla_bench.policies.capabilities import Capabilities
from vla_bench.protocol import reference_protocol

MAX_STEPS = 12


def _digest(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


class ChaoticEnv:
    """Each slot runs its own episode; the observation is a hash of the task, init state, seed and every action so
    far, and the episode succeeds when that hash says so: an outcome depends on exactly the actions it received."""

    def __init__(self, n):
        self.n = n
        self.state = {}
        self.batches = []  # slots stepped together

    def _obs(self, slot):
        task, init, seed, history = self.state[slot]
        return {"value": _digest(task, init, seed, history), "task": task}

    def reset_task(self, slot, task, init_index, seed):
        self.state[slot] = (task, init_index, seed, ())
        return Answer(self._obs(slot), scene_check="match", renderer="fake")

    def step(self, actions):
        self.batches.append(sorted(actions))
        out = {}
        for slot, action in actions.items():
            task, init, seed, history = self.state[slot]
            self.state[slot] = (task, init, seed, history + (tuple(np.round(action, 6)),))
            obs = self._obs(slot)
            out[slot] = Answer(obs, done=obs["value"] % 7 == 0)
        return out


class TaskAwarePool(FakePool):
    """FakePool whose resets tell the env which task's spec the command named."""

    def __init__(self, env, n=None):
        super().__init__(env, n)
        env.reset = self._reset

    def _reset(self, requests):
        return {slot: self.env.reset_task(slot, self._task[slot], *request) for slot, request in requests.items()}

    def submit(self, slot, command, spec, *args):
        self._task = getattr(self, "_task", {})
        self._task[slot] = spec.task_index
        super().submit(slot, command, spec, *args)


class Reactive:
    """A model-like policy (acts from the main process) whose action depends on its observation, its own per-slot
    state since the episode's reset, and which checkpoint it is."""

    capabilities = Capabilities()

    def __init__(self, name):
        self.name, self.memory = name, {}

    def reset(self, slot, seed):
        self.memory[slot] = seed

    def act(self, observations, instructions, slots):
        out = []
        for obs, slot in zip(observations, slots):
            self.memory[slot] = _digest(self.memory[slot], obs["value"], self.name)
            rng = np.random.default_rng(self.memory[slot])
            out.append(np.concatenate([rng.uniform(-1, 1, 6), [1.0 if rng.random() < 0.5 else -1.0]]))
        return np.array(out)


def run_jobs(jobs, workers, groups, order=None):
    """{(checkpoint, task, init): (success, steps)} of the given (checkpoint, task, init indices) jobs."""
    protocol = reference_protocol("libero_spatial", episodes=10, max_steps=MAX_STEPS)
    env = ChaoticEnv(workers)
    scheduler = Scheduler(TaskAwarePool(env, workers), groups)
    policies = {name: Reactive(name) for name, _, _ in jobs}
    rows = {}
    for k in (order or range(len(jobs))):
        name, task, inits = jobs[k]

        def on_done(outcome, name=name, task=task):
            key = (name, task, outcome.init_index)
            assert key not in rows, f"{key} reported twice"
            rows[key] = (outcome.success, outcome.steps, outcome.error)

        scheduler.add(Job(f"{name} task{task}", [policies[name]], EnvSpec(protocol, task), f"task {task}", inits,
                          lambda i, task=task: protocol.episode_seed(task, i), on_done))
    scheduler.run()
    return rows, env, scheduler.stats


JOBS = [("a", 0, range(6)), ("b", 0, range(6)), ("a", 3, range(5)), ("b", 3, [4, 2, 0])]


def test_interleaved_jobs_give_the_rows_they_give_one_by_one():
    together, _, stats = run_jobs(JOBS, workers=4, groups=2)
    alone = {}
    for job in JOBS:
        alone.update(run_jobs([job], workers=1, groups=1)[0])
    assert together == alone and len(together) == 20
    assert {s for s, _, _ in together.values()} == {True, False}  # both outcomes occur: the test can tell them apart
    assert stats.episodes == 20 and stats.actions == sum(steps for _, steps, _ in together.values())


@settings(max_examples=25, deadline=None)
@given(workers=st.integers(1, 7), groups=st.integers(1, 3), order=st.permutations(range(len(JOBS))))
def test_outcomes_do_not_depend_on_workers_groups_or_job_order(workers, groups, order):
    """For any number of workers and groups and any order of adding the jobs, every episode of every job is
    reported once, with the outcome and steps it has when run alone."""
    reference = run_jobs(JOBS, workers=1, groups=1)[0]
    assert run_jobs(JOBS, workers, groups, list(order))[0] == reference


def test_a_group_acts_while_the_other_groups_simulate():
    """With two groups, every act() holds one group's slots, and while it runs the other group's steps are in
    flight in the pool (the GPU and the simulator overlap)."""
    protocol = reference_protocol("libero_spatial", episodes=10, max_steps=MAX_STEPS)
    pool = TaskAwarePool(ChaoticEnv(4), 4)
    policy, calls = Reactive("a"), []
    act = policy.act

    def spy(observations, instructions, slots):
        calls.append((set(slots), set(pool.busy)))
        pool.tick()  # computing takes time: what was submitted before finishes first
        return act(observations, instructions, slots)

    policy.act = spy
    scheduler = Scheduler(pool, 2)
    scheduler.add(Job("a", [policy], EnvSpec(protocol, 0), "t", range(8), lambda i: i, lambda o: None))
    scheduler.run()
    assert all({s % 2 for s in slots} in ({0}, {1}) for slots, _ in calls)
    alone = [slots for slots, busy in calls if not {s % 2 for s in busy} - {s % 2 for s in slots}]
    assert alone == [{0, 2}], calls  # only the very first batch ran with no other group's steps in flight
    assert 0 < scheduler.stats.busy <= 1


def test_a_job_told_to_stop_starts_no_further_episode():
    protocol = reference_protocol("libero_spatial", episodes=10, max_steps=MAX_STEPS)
    done = []
    scheduler = Scheduler(TaskAwarePool(ChaoticEnv(2), 2), 1)
    scheduler.add(Job("a", [Reactive("a")], EnvSpec(protocol, 0), "t", range(10), lambda i: i,
                      lambda o: done.append(o.init_index) or len(done) >= 3))
    scheduler.run()
    assert 3 <= len(done) <= 4  # the episode in flight in the other slot still finishes
    assert scheduler.jobs[0].finished


def test_replicas_each_keep_their_own_slots():
    """With two replicas, a slot's episodes always go to the same replica (its per-slot state lives there)."""
    protocol = reference_protocol("libero_spatial", episodes=10, max_steps=MAX_STEPS)
    first, second = Reactive("a"), Reactive("a")  # same weights, two devices
    seen = {id(first): set(), id(second): set()}
    for policy in (first, second):
        act = policy.act

        def spy(observations, instructions, slots, policy=policy, act=act):
            seen[id(policy)].update(slots)
            return act(observations, instructions, slots)
        policy.act = spy
    rows = {}
    scheduler = Scheduler(TaskAwarePool(ChaoticEnv(4), 4), 1)
    scheduler.add(Job("a", [first, second], EnvSpec(protocol, 0), "t", range(6), lambda i: protocol.episode_seed(0, i),
                      lambda o: rows.update({o.init_index: (o.success, o.steps)})))
    scheduler.run()
    scheduler.close()
    assert seen[id(first)] == {0, 2} and seen[id(second)] == {1, 3}
    alone = run_jobs([("a", 0, range(6))], workers=1, groups=1)[0]
    assert rows == {i: (s, n) for (_, _, i), (s, n, _) in alone.items()}


def test_every_group_is_spread_over_every_replica():
    """With two lockstep groups and two replicas, each group's batch has slots on both replicas (so both devices
    compute at once), every slot keeps one replica, and each outcome names the replica that acted for it."""
    protocol = reference_protocol("libero_spatial", episodes=10, max_steps=MAX_STEPS)
    replicas = [Reactive("a"), Reactive("a")]
    calls = []  # (replica, slots) of every act
    for k, policy in enumerate(replicas):
        act = policy.act

        def spy(observations, instructions, slots, k=k, act=act):
            calls.append((k, tuple(slots)))
            return act(observations, instructions, slots)
        policy.act = spy
    outcomes = []
    scheduler = Scheduler(TaskAwarePool(ChaoticEnv(8), 8), 2)
    scheduler.add(Job("a", replicas, EnvSpec(protocol, 0), "t", range(16), lambda i: protocol.episode_seed(0, i),
                      outcomes.append))
    scheduler.run()
    scheduler.close()
    replica_of_slot = {}
    for k, slots in calls:
        for slot in slots:
            assert replica_of_slot.setdefault(slot, k) == k
    for group in (0, 1):
        assert {replica_of_slot[s] for s in range(8) if s % 2 == group} == {0, 1}
    assert all(o.replica == replica_of_slot[o.slot] for o in outcomes) and len(outcomes) == 16


def test_slots_are_spread_over_the_jobs_and_keep_their_task():
    """Six slots and three jobs of six episodes each: two slots start on each job, and a slot whose job has
    episodes left is never moved to another task (a move costs a new env)."""
    protocol = reference_protocol("libero_spatial", episodes=10, max_steps=MAX_STEPS)
    pool = TaskAwarePool(ChaoticEnv(6), 6)
    served = []  # (slot, task) of every reset, in order
    submit = pool.submit

    def spy(slot, command, spec, *args):
        if command == "reset":
            served.append((slot, spec.task_index))
        submit(slot, command, spec, *args)

    pool.submit = spy
    scheduler = Scheduler(pool, 2)
    jobs = [Job(f"task{t}", [Reactive("a")], EnvSpec(protocol, t), "t", range(6), lambda i: i, lambda o: None)
            for t in (0, 1, 2)]
    for job in jobs:
        scheduler.add(job)
    scheduler.run()
    first = dict(served[:6])
    assert sorted(first.values()) == [0, 0, 1, 1, 2, 2]
    last_task: dict = {}
    for k, (slot, task) in enumerate(served):
        if slot in last_task and last_task[slot] != task:  # a move: the old task had nothing left to start
            remaining_before = [t for s, t in served[k:]]
            assert last_task[slot] not in remaining_before
        last_task[slot] = task
    assert all(job.finished for job in jobs)


def test_time_blocked_on_the_simulators_is_counted_apart_from_the_policys():
    """Every second the loop spends inside pool.wait() (the simulators late, the policy idle) goes to wait_s and
    none to policy_s; busy + sim_wait never exceeds the whole."""
    protocol = reference_protocol("libero_spatial", episodes=10, max_steps=MAX_STEPS)
    pool = TaskAwarePool(ChaoticEnv(2), 2)
    blocked = []
    wait = pool.wait

    def slow_wait(*args, **kwargs):
        start = time.perf_counter()
        time.sleep(0.005)  # a simulator step that is not ready yet
        answers = wait(*args, **kwargs)
        blocked.append(time.perf_counter() - start)
        return answers

    pool.wait = slow_wait
    scheduler = Scheduler(pool, 1)
    scheduler.add(Job("a", [Reactive("a")], EnvSpec(protocol, 0), "t", range(2), lambda i: i, lambda o: None))
    scheduler.run()
    stats = scheduler.stats
    assert blocked and stats.wait_s >= sum(blocked) * 0.999
    assert stats.wait_s + stats.policy_s <= stats.wall_s
    assert stats.as_dict()["sim_wait"] == round(stats.wait_s / stats.wall_s, 4) and 0 < stats.sim_wait < 1


class TimedEnv(ChaoticEnv):
    """ChaoticEnv whose step answers carry a worker's timing: slot s took 10 * (s + 1) ms, 4 of them rendering and
    1 transforming, and finished when its answer was made."""

    def step(self, actions):
        out = super().step(actions)
        for slot, answer in out.items():
            finished = time.monotonic()
            answer.timing = StepTiming(finished - 0.010 * (slot + 1), finished, 0.004, 0.001)
        return out


def test_step_timings_add_up_per_step_and_per_group():
    """Every step answer's worker timing is counted once: the mean worker time is the mean of the slots' own times
    weighted by their steps, renders and transforms likewise; each lockstep batch whose steps all came back gives
    one group span, which starts when its actions left and so lies within the run's wall time (two groups' spans
    overlap, so together they stay under twice the wall time)."""
    protocol = reference_protocol("libero_spatial", episodes=10, max_steps=MAX_STEPS)
    env = TimedEnv(4)
    pool = TaskAwarePool(env, 4)
    scheduler = Scheduler(pool, 2)
    scheduler.add(Job("a", [Reactive("a")], EnvSpec(protocol, 0), "t", range(6), lambda i: i, lambda o: None))
    scheduler.run()
    stats, timing = scheduler.stats, scheduler.stats.step_timing()
    stepped = [slot for batch in env.batches for slot in batch]
    assert stats.steps_timed == len(stepped) == stats.actions
    assert timing["sim_ms"] == round(1000 * sum(0.010 * (s + 1) for s in stepped) / len(stepped), 2)
    assert timing["render_ms"] == 4.0 and timing["transform_ms"] == 1.0
    assert stats.spans == sum(stats.batches.values())
    assert 0 < stats.span_s <= 2 * stats.wall_s and stats.lag_s >= 0  # the two groups' spans overlap in time
    assert timing["policy_ms_per_batch"] == round(1000 * stats.policy_s / stats.spans, 2)
    assert stats.as_dict()["step_timing"] == timing


def test_no_step_timing_without_timed_answers():
    """A pool whose answers carry no timing (a remote or stand-in simulator) reports no step timing, not zeros."""
    protocol = reference_protocol("libero_spatial", episodes=10, max_steps=MAX_STEPS)
    scheduler = Scheduler(TaskAwarePool(ChaoticEnv(2), 2), 2)
    scheduler.add(Job("a", [Reactive("a")], EnvSpec(protocol, 0), "t", range(2), lambda i: i, lambda o: None))
    scheduler.run()
    assert scheduler.stats.step_timing() == {} and scheduler.stats.spans == 0
