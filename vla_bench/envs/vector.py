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
import traceback
from dataclasses import dataclass

import numpy as np

from ..protocol import Protocol


@dataclass
class SlotResult:
    obs: dict | None
    done: bool = False
    error: str | None = None


def _worker(conn, protocol: Protocol, task_index: int, cameras: tuple, privileged: bool) -> None:
    # one BLAS thread per worker: the workers already fill the cores, more threads only oversubscribe them
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    env = None
    try:
        from .libero import LiberoTaskEnv

        env = LiberoTaskEnv(protocol, task_index, cameras, privileged)
        conn.send(("ready", env.backend))
        while True:
            command, *args = conn.recv()
            if command == "close":
                break
            try:
                if command == "reset":
                    conn.send(("ok", SlotResult(env.reset(*args))))
                elif command == "step":
                    obs, done = env.step(args[0])
                    conn.send(("ok", SlotResult(obs, done)))
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


class VectorLiberoEnv:
    """`n` workers for one (suite, task); `reset(slot, init_index, seed)` and `step({slot: action})`."""

    def __init__(self, protocol: Protocol, task_index: int, n: int, cameras: tuple[str, ...] = (),
                 privileged: bool = False):
        self.args = (protocol, task_index, tuple(cameras), privileged)
        self.ctx = mp.get_context("spawn")
        self.workers: list = [None] * n
        self.backend = None
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
