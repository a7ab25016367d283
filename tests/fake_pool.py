"""Stand-ins for the engine's worker pool, so the scheduler's bookkeeping is tested without a simulator.

A test's fake env answers whole batches, `reset({slot: (init_index, seed)})` and `step({slot: action})`, each
returning {slot: Answer}. FakePool gives it the pool's asynchronous interface: commands submitted between two
`wait` calls are answered together, as one reset batch and one step batch, so a scheduler with one group calls the
fake env once per lockstep step, as the engine steps a real pool. Commands submitted earlier are answered
earlier: one `wait` answers the oldest round of submissions only (what a real pool does when every command takes
the same time). A round ends at each `wait` and at each `tick()`, which a test calls where time passes (inside a
policy's act), so a second group's commands are still in flight when the first group's answers come back.
"""
import numpy as np

from vla_bench.engine.episode import run_in_worker
from vla_bench.engine.pool import Answer, EnvSpec, WorkerPool
from vla_bench.engine.scheduler import run_episodes


class FakePool:
    def __init__(self, env, n: int | None = None):
        self.env = env
        self.n = n if n is not None else env.n
        self._pending: dict[int, tuple] = {}
        self._round: dict[int, int] = {}  # slot -> the wait() count when its command was submitted
        self._waits = 0
        self._kept: dict = {}
        self.closed = False

    def keep(self, slot, key, obj):
        if obj is not None:
            self._kept[key] = obj

    def submit(self, slot, command, spec, *args):
        assert slot not in self._pending, f"slot {slot} already has a command in flight"
        self._pending[slot] = (command, spec, args)
        self._round[slot] = self._waits

    def tick(self):
        self._waits += 1

    @property
    def busy(self):
        return set(self._pending)

    def wait(self, slots=None, timeout=None):
        self._waits += 1
        oldest = min((self._round[s] for s in self._pending), default=None)
        pending = {s: p for s, p in self._pending.items() if self._round[s] == oldest}
        for slot in pending:
            del self._pending[slot]
        resets = {s: (args[1], args[2]) for s, (c, _, args) in pending.items() if c == "reset"}
        steps = {s: args[1] for s, (c, _, args) in pending.items() if c == "step"}
        answers = {}
        if resets:
            answers.update(self._transformed(self.env.reset(resets), pending))
        if steps:
            answers.update(self._transformed(self.env.step(steps), pending))
        for slot, (command, spec, args) in pending.items():
            if command == "episode":
                policy_key, transform_key, request = args
                answers[slot] = Answer(episode=run_in_worker(self.env.worker(slot), self._kept[policy_key], request))
        return answers

    def _transformed(self, answers, pending):
        for slot, answer in answers.items():
            transform = self._kept.get(pending[slot][2][0])
            if transform is not None and answer.obs is not None:
                answer.obs = transform(answer.obs)
        return answers

    def close(self):
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def rollout_episodes(policy, env, protocol, task_index, instruction, init_indices, on_done, record_frames=False,
                     groups=1):
    """One task's episodes on a fake env, through the engine's scheduler (groups=1: plain lockstep)."""
    pool = env if hasattr(env, "submit") else FakePool(env)
    return run_episodes(policy, pool, protocol, task_index, instruction, init_indices, on_done, record_frames,
                        groups)


class PoolEnv:
    """The real worker pool behind a synchronous batch interface (reset/step over {slot: ...}), for simulator
    tests that drive single steps themselves."""

    def __init__(self, protocol, task_index, n, cameras=(), privileged=False, transform=None, arenas=True):
        self.pool = WorkerPool(n, arenas)
        self.spec = EnvSpec(protocol, task_index, tuple(cameras), privileged)
        self.transform_key = ("transform", id(transform)) if transform is not None else None
        for slot in range(n):
            self.pool.keep(slot, self.transform_key, transform)

    def reset(self, requests):
        for slot, (init_index, seed) in requests.items():
            self.pool.submit(slot, "reset", self.spec, self.transform_key, init_index, seed)
        return self._answers(len(requests))

    def step(self, actions):
        for slot, action in actions.items():
            self.pool.submit(slot, "step", self.spec, self.transform_key, np.asarray(action))
        return self._answers(len(actions))

    def _answers(self, count):
        answers = {}
        while len(answers) < count:
            answers.update(self.pool.wait())
        return answers

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.pool.close()
