"""The one pool of simulator worker processes, for evaluation and for `vla-bench collect`.

Each worker owns at most one LIBERO task environment at a time, built for the `EnvSpec` of the command it serves
and kept while commands keep naming that spec (building one costs seconds); any worker can serve any task, so one
pool serves every job of a session. Commands are asynchronous: `submit` sends one, `wait` returns the answers that
have arrived, so the caller (engine/scheduler.py) computes one group's actions while other workers simulate.

Commands:
  reset    start an evaluation episode on an init state (or, for collect, from LIBERO's random placement) and
           answer with the first observation
  step     execute one action and answer with the next observation and LIBERO's done flag
  episode  run a whole episode inside the worker with the worker's own copy of an in-worker policy (the scripted
           expert, the controls: batching gains them nothing and the main process would act for every slot in turn)

Workers are started with the 'spawn' method: forking a process that holds a GL context or CUDA state is unsafe,
and spawn gives each worker a clean import order (see envs/libero.py on robosuite and triton). Policies and frame
transforms travel to a worker once, the first time it needs them, and stay there under their key.

A simulator exception inside a worker is that slot's answer as an error (the episode is recorded as an error, not a
failure); a worker that dies outright is restarted and its episode answered as an error too.
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import sys
import time
import traceback
from multiprocessing.connection import wait as wait_for_connections
from typing import Any

from ..protocol import Protocol
from ..envs.rendering import private_workdir
from .arena import Arena, fits_in_shm


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """Which simulator a command needs: a worker keeps its env while commands name an equal spec."""
    protocol: Protocol
    task_index: int
    cameras: tuple[str, ...] = ()
    privileged: bool = False


@dataclasses.dataclass
class Answer:
    """A worker's answer to one command. For reset/step: `obs` (None on error), `done`, and after a reset the
    settled scene's verdict; for episode: `episode` (engine/episode.py's EpisodeOutcome or a collect demo)."""
    obs: dict | None = None
    done: bool = False
    error: str | None = None
    scene_check: str | None = None
    episode: Any = None
    init_state: Any = None  # collect: the flattened sim state right after a random reset
    renderer: str | None = None  # after a reset: the renderer that draws (envs/libero.py LiberoTaskEnv.renderer)
    timing: StepTiming | None = None  # after a step: where the worker's time went


@dataclasses.dataclass(frozen=True)
class StepTiming:
    """Where a worker's time on one step went. `started`/`finished` are time.monotonic(), one clock for every process
    of a host, so the scheduler can tell how long a group's simulators took from its own submit time."""
    started: float
    finished: float
    render_s: float  # inside the simulator's camera renders (on the GPU host: the GPU the model also uses)
    transform_s: float  # the policy's frame transform (JPEG round trip, resize)


def _build_env(spec: EnvSpec):
    from ..envs.libero import LiberoTaskEnv

    return LiberoTaskEnv(spec.protocol, spec.task_index, spec.cameras, spec.privileged)


def _worker(conn, arena_name: str | None) -> None:
    # one BLAS thread per worker: the workers already fill the cores, more threads only oversubscribe them
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    workdir = private_workdir()  # MuJoCo's MUJOCO_LOG.TXT goes there, not into the user's folder
    arena = Arena(arena_name) if arena_name else None  # large arrays of answers go there (engine/arena.py)
    env, env_spec = None, None
    kept: dict = {}  # key -> policy or frame transform sent once by the pool
    torch_threads_set = False
    try:
        conn.send(("ready", None))
        while True:
            command, *args = conn.recv()
            started = time.monotonic()
            if command == "close":
                break
            if command == "keep":  # ("keep", key, object): a policy or transform this worker will be asked to use
                key, obj = args
                kept[key] = obj
                if not torch_threads_set and "torch" in sys.modules:  # a frame transform brought torch in
                    import torch  # only after the simulator (see policies/base.py), and one thread of it

                    torch.set_num_threads(1)
                    torch_threads_set = True
                continue
            try:
                spec, *rest = args
                if env_spec != spec:  # another task: build its env (the old one is closed first)
                    if env is not None:
                        env.close()
                    env, env_spec = None, None
                    env = _build_env(spec)
                    env_spec = spec
                if command == "reset":
                    transform_key, init_index, seed = rest
                    answer = _reset(env, init_index, seed)
                    answer.obs = _transformed(kept, transform_key, answer.obs)
                elif command == "step":
                    transform_key, action = rest
                    rendered = env.render_s
                    obs, done = env.step(action)
                    stepped = time.monotonic()
                    answer = Answer(_transformed(kept, transform_key, obs), done)
                    finished = time.monotonic()
                    answer.timing = StepTiming(started, finished, env.render_s - rendered, finished - stepped)
                elif command == "episode":
                    from .episode import run_in_worker

                    policy_key, transform_key, request = rest
                    answer = Answer(episode=run_in_worker(env, kept[policy_key], request,
                                                          kept.get(transform_key)))
                else:
                    raise ValueError(f"unknown command {command!r}")
                if command == "reset":
                    answer.renderer = env.renderer
                    if answer.init_state is None:
                        answer.scene_check = str(env.scene_check)
                if arena is not None and answer.obs is not None:
                    answer.obs = arena.pack(answer.obs)
                conn.send(("ok", answer))
            except Exception:  # a simulator error ends this episode only; the next reset starts clean
                conn.send(("ok", Answer(error=traceback.format_exc(limit=4))))
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        if env is not None:
            env.close()
        if arena is not None:
            arena.close()
        conn.close()
        workdir.cleanup()


def _reset(env, init_index, seed) -> Answer:
    if init_index is None:  # collect: LIBERO's own random placement, never an evaluation init state
        obs, init_state = env.reset_random(seed)
        return Answer(obs, init_state=init_state)
    return Answer(env.reset(init_index, seed))


def _transformed(kept: dict, transform_key, obs):
    transform = kept.get(transform_key) if transform_key is not None else None
    return transform(obs) if transform is not None and obs is not None else obs


class WorkerPool:
    """`n` simulator workers; slots are numbered 0 .. n-1. Use as a context manager (close stops the workers).

    Each slot has a shared-memory arena through which its answers' camera frames travel (engine/arena.py), unless
    /dev/shm is too small for them or `arenas=False`."""

    def __init__(self, n: int, arenas: bool = True):
        self.ctx = mp.get_context("spawn")
        self.workers: list = [None] * n
        self._kept: list[set] = [set() for _ in range(n)]  # keys each worker holds
        self._pending: dict = {}  # connection -> slot with a command in flight
        self.arenas: list[Arena | None] = [Arena(create=True) if arenas and fits_in_shm(n) else None
                                           for _ in range(n)]
        for slot in range(n):
            self._start(slot)
        for slot in range(n):
            self._ready(slot)

    @property
    def n(self) -> int:
        return len(self.workers)

    def _start(self, slot: int) -> None:
        parent, child = self.ctx.Pipe()
        arena = self.arenas[slot]
        proc = self.ctx.Process(target=_worker, args=(child, arena.name if arena else None), daemon=True)
        proc.start()
        child.close()
        self.workers[slot] = (proc, parent)
        self._kept[slot] = set()

    def _ready(self, slot: int) -> None:
        status, payload = self._recv(slot)
        if status != "ready":
            raise RuntimeError(f"simulator worker failed to start:\n{payload}")

    def _recv(self, slot: int):
        proc, conn = self.workers[slot]
        try:
            return conn.recv()
        except (EOFError, ConnectionResetError, OSError):
            proc.join(timeout=5)
            return "dead", f"simulator worker died (exit code {proc.exitcode})"

    def _send(self, slot: int, message: tuple) -> bool:
        try:
            self.workers[slot][1].send(message)
            return True
        except (BrokenPipeError, OSError):
            return False

    def keep(self, slot: int, key, obj) -> None:
        """Make sure worker `slot` holds `obj` (a policy or a frame transform) under `key`; sent once per worker."""
        if obj is not None and key not in self._kept[slot]:
            self._send(slot, ("keep", key, obj))
            self._kept[slot].add(key)

    def submit(self, slot: int, command: str, spec: EnvSpec, *args) -> None:
        """Send one command to worker `slot`; its answer comes back through `wait`. One command per slot at a time."""
        conn = self.workers[slot][1]
        if conn in self._pending:
            raise RuntimeError(f"slot {slot} already has a command in flight")
        self._pending[conn] = slot
        self._send(slot, (command, spec, *args))  # a dead worker: wait() reads its pipe and answers with the error

    @property
    def busy(self) -> set[int]:
        return set(self._pending.values())

    def wait(self, slots=None, timeout: float | None = None) -> dict[int, Answer]:
        """The answers that have arrived (blocking until at least one, or `timeout`), optionally only from `slots`."""
        conns = [c for c, s in self._pending.items() if slots is None or s in slots]
        if not conns:
            return {}
        answers = {}
        for conn in wait_for_connections(conns, timeout):
            slot = self._pending.pop(conn)
            status, payload = self._recv(slot)
            if status == "ok":
                if self.arenas[slot] is not None and payload.obs is not None:
                    payload.obs = self.arenas[slot].unpack(payload.obs)  # copied out before the slot's next command
                answers[slot] = payload
            else:  # the worker is gone (segfault, OOM kill): answer with the error and replace it
                answers[slot] = Answer(error=str(payload))
                self._restart(slot)
        return answers

    def _restart(self, slot: int) -> None:
        proc, conn = self.workers[slot]
        conn.close()
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
        self._start(slot)
        self._ready(slot)

    def close(self) -> None:
        for slot in range(self.n):
            self._send(slot, ("close",))
        for proc, conn in self.workers:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
            conn.close()
        for arena in self.arenas:
            if arena is not None:
                arena.close()
        self.workers, self.arenas = [], []
        self._pending = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
