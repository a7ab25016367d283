"""Several LIBERO task environments stepped in parallel, one worker process each.

The policy stays in the calling process and acts on the batch of all running slots (one batched model call per
control step); each worker owns one LiberoTaskEnv of the same task. Workers are started with the 'spawn' method:
forking a process that holds a GL context or CUDA state is unsafe, and spawn gives each worker a clean import
order (see envs/libero.py on robosuite and triton).

A simulator exception inside a worker is returned as that slot's error (the episode is recorded as an error, not
a failure); a worker that dies outright is restarted and its episode recorded as an error too.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from multiprocessing.connection import wait
from dataclasses import dataclass

import numpy as np

from ..protocol import Protocol
from .rendering import private_workdir


@dataclass
class SlotResult:
    obs: dict | None
    done: bool = False
    error: str | None = None
    scene_check: str | None = None  # after a reset: the settled scene's verdict (envs/fingerprint.py)


def _run_episode(env, policy, init_index: int, seed: int, instruction: str, record_frames: bool) -> dict:
    """One whole episode inside the worker, for policies cheap enough to copy into every worker."""
    from ..rollout import action_error, upright_frame

    started = time.perf_counter()
    policy.reset(0, seed)
    obs = env.reset(init_index, seed)
    frames = [upright_frame(obs)] if record_frames else None
    success, steps = False, 0
    while steps < env.protocol.max_steps and not success:
        actions = np.asarray(policy.act([obs], [instruction], [0]))
        error = action_error(actions[0] if actions.shape[:1] == (1,) else actions, steps + 1)
        if error is not None:
            return SlotResult(None, error=error)
        obs, success = env.step(actions[0])
        steps += 1
        if record_frames:
            frames.append(upright_frame(obs))
    return dict(success=success, steps=steps, wall_s=time.perf_counter() - started, frames=frames,
                scene_check=str(env.scene_check))


def _worker(conn, protocol: Protocol, task_index: int, cameras: tuple, privileged: bool, policy=None,
            transform=None) -> None:
    # one BLAS thread per worker: the workers already fill the cores, more threads only oversubscribe them
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    env = None
    workdir = private_workdir()  # MuJoCo's MUJOCO_LOG.TXT goes there, not into the user's folder
    try:
        from .libero import LiberoTaskEnv

        env = LiberoTaskEnv(protocol, task_index, cameras, privileged)
        if transform is not None:  # torch only after the simulator (see policies/base.py), and one thread of it
            import torch

            torch.set_num_threads(1)
        observe = transform if transform is not None else (lambda obs: obs)
        conn.send(("ready", env.renderer))
        while True:
            command, *args = conn.recv()
            if command == "close":
                break
            try:
                if command == "reset":
                    obs = env.reset(*args)
                    conn.send(("ok", SlotResult(observe(obs), scene_check=str(env.scene_check))))
                elif command == "step":
                    obs, done = env.step(args[0])
                    conn.send(("ok", SlotResult(observe(obs), done)))
                elif command == "episode":
                    conn.send(("ok", _run_episode(env, policy, *args)))
            except Exception:  # a simulator error ends this episode only; the env is reset for the next one
                conn.send(("ok", SlotResult(None, error=traceback.format_exc(limit=4))))
    except (EOFError, KeyboardInterrupt):
        pass
    except Exception:
        conn.send(("fatal", traceback.format_exc()))
    finally:
        if env is not None:
            env.close()
        conn.close()
        workdir.cleanup()


class VectorLiberoEnv:
    """`n` workers for one (suite, task); `reset(slot, init_index, seed)` and `step({slot: action})`."""

    def __init__(self, protocol: Protocol, task_index: int, n: int, cameras: tuple[str, ...] = (),
                 privileged: bool = False, local_policy=None, observation_transform=None):
        """local_policy: a copy of the policy for every worker (see `run_episodes`), or None.
        observation_transform: applied by each worker to its observations (policies/base.py), or None."""
        self.args = (protocol, task_index, tuple(cameras), privileged, local_policy, observation_transform)
        self.ctx = mp.get_context("spawn")
        self.workers: list = [None] * n
        self.backend = None  # the renderer that draws, e.g. 'egl: NVIDIA Corporation NVIDIA H200/PCIe/SSE2'
        for slot in range(n):
            self._start(slot)
        for slot in range(n):
            self.backend = self._ready(slot)

    def _start(self, slot: int) -> None:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker, args=(child, *self.args), daemon=True)
        proc.start()
        child.close()
        self.workers[slot] = (proc, parent)

    def _ready(self, slot: int) -> str:
        status, payload = self._recv(slot)
        if status != "ready":
            raise RuntimeError(f"LIBERO env worker failed to start:\n{payload}")
        return payload

    def _recv(self, slot: int):
        proc, conn = self.workers[slot]
        try:
            return conn.recv()
        except (EOFError, ConnectionResetError):
            return "dead", f"env worker died (exit code {proc.exitcode})"

    @property
    def n(self) -> int:
        return len(self.workers)

    def reset(self, requests: dict[int, tuple[int, int]]) -> dict[int, SlotResult]:
        """requests: {slot: (init_index, seed)}; the resets run in parallel."""
        return self._call({slot: ("reset", *req) for slot, req in requests.items()})

    def step(self, actions: dict[int, np.ndarray]) -> dict[int, SlotResult]:
        return self._call({slot: ("step", np.asarray(a)) for slot, a in actions.items()})

    def _call(self, commands: dict[int, tuple]) -> dict[int, SlotResult]:
        for slot, command in commands.items():
            try:
                self.workers[slot][1].send(command)
            except (BrokenPipeError, OSError):
                pass  # reported as a dead worker by _recv below
        results = {}
        for slot in commands:
            status, payload = self._recv(slot)
            if status == "ok":
                results[slot] = payload
            else:  # the worker is gone (segfault, OOM kill): record the episode as an error and replace it
                results[slot] = SlotResult(None, error=str(payload))
                self._restart(slot)
        return results

    def run_episodes(self, requests, on_result) -> None:
        """Whole episodes inside the workers, each worker with its own copy of the policy: for CPU policies (the
        scripted expert, the controls) the main process would otherwise compute every slot's action in turn and
        become the bottleneck (measured: 16 expert slots in lockstep took ~130 ms a step on a 16-core host).
        requests: iterable of (init_index, seed, instruction, record_frames); on_result(request, result dict or
        error string) returns True to stop scheduling new episodes."""
        queue = list(requests)[::-1]
        busy: dict = {}  # connection -> (slot, request)
        stopped = False

        def submit(slot: int) -> None:
            if queue and not stopped:
                request = queue.pop()
                conn = self.workers[slot][1]
                conn.send(("episode", *request))
                busy[conn] = (slot, request)

        for slot in range(self.n):
            submit(slot)
        while busy:
            for conn in wait(list(busy)):
                slot, request = busy.pop(conn)
                status, payload = self._recv(slot)
                if status == "ok" and isinstance(payload, SlotResult):  # the episode's reset or step failed
                    payload = payload.error
                elif status != "ok":
                    payload = str(payload)
                    self._restart(slot)
                if on_result(request, payload):
                    stopped = True
                submit(slot)

    def _restart(self, slot: int) -> None:
        proc, conn = self.workers[slot]
        conn.close()
        proc.join(timeout=5)
        self._start(slot)
        self._ready(slot)

    def close(self) -> None:
        for proc, conn in self.workers:
            try:
                conn.send(("close",))
            except (BrokenPipeError, OSError):
                pass
        for proc, conn in self.workers:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
            conn.close()
        self.workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
