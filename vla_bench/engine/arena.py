"""Observations' large arrays (camera frames) travel from a simulator worker to the main process through a per-slot
block of shared memory; only a small message goes through the worker's pipe.

Why: on the GPU host (48 workers, 16 cores) reading ~350 kB answers (a 256x256 camera frame and the policy's
prepared 224x224 frame) through the pipes cost ~2 ms an answer, 51 ms of every 211 ms batch of 24 slots, while the
GPU sat idle; reading them in a thread instead slowed every batch by ~40 ms (the reader and the model's host code
taking turns on the GIL). Copying a frame out of shared memory costs tens of microseconds.

The worker writes each large array of an answer into its slot's arena and sends a reference (`InArena`); the main
process copies every referenced array out as soon as it receives the answer, before the slot gets its next command,
so the next answer may overwrite the arena. Arrays that do not fit travel pickled as before (correct, slower). The
arena is a convenience: a pool whose /dev/shm cannot hold it works without one.
"""
from __future__ import annotations

import dataclasses
import os
from multiprocessing import shared_memory

import numpy as np

#: per slot: one 256x256 RGB camera (196 kB) with its prepared frame (150 kB), or two cameras, with room to spare
ARENA_BYTES = 1 << 20
#: smaller arrays (proprioception, object states) travel pickled: a reference would cost about as much as the data
INLINE_BELOW = 16 << 10
_ALIGN = 64


@dataclasses.dataclass(frozen=True)
class InArena:
    """Where an array of an answer lies in its slot's arena."""
    offset: int
    shape: tuple[int, ...]
    dtype: str


def fits_in_shm(n: int, size: int = ARENA_BYTES) -> bool:
    """Whether /dev/shm has room for `n` arenas with half of it to spare (a container's default 64 MB /dev/shm
    fills up and a worker writing past it dies of SIGBUS, so the pool goes without arenas then)."""
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return False
    return n * size <= stat.f_bavail * stat.f_frsize // 2


class Arena:
    """One slot's shared block: created by the pool (`create=True`), attached by its worker by name."""

    def __init__(self, name: str | None = None, create: bool = False, size: int = ARENA_BYTES):
        self.shm = shared_memory.SharedMemory(name=name, create=create, size=size)
        self.owner = create
        self.bytes = np.ndarray((self.shm.size,), np.uint8, buffer=self.shm.buf)

    @property
    def name(self) -> str:
        return self.shm.name

    def pack(self, obj):
        """`obj` (dicts, lists and tuples of arrays and other values) with its large arrays written into the arena
        and replaced by InArena references, as long as they fit."""
        cursor = [0]

        def put(value):
            if isinstance(value, np.ndarray):
                if (value.nbytes < INLINE_BELOW or value.dtype.hasobject
                        or cursor[0] + value.nbytes > len(self.bytes)):
                    return value
                start = cursor[0]
                self.bytes[start:start + value.nbytes] = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
                cursor[0] = -(-(start + value.nbytes) // _ALIGN) * _ALIGN
                return InArena(start, value.shape, value.dtype.str)
            return _rebuilt(value, put)

        return put(obj)

    def unpack(self, obj):
        """`obj` with every InArena reference replaced by its own copy of the array (the arena is reused)."""
        def get(value):
            if isinstance(value, InArena):
                dtype = np.dtype(value.dtype)
                count = int(np.prod(value.shape, dtype=np.int64)) * dtype.itemsize
                return self.bytes[value.offset:value.offset + count].view(dtype).reshape(value.shape).copy()
            return _rebuilt(value, get)

        return get(obj)

    def close(self) -> None:
        self.bytes = None  # the ndarray must go before the buffer it views
        self.shm.close()
        if self.owner:
            self.shm.unlink()


def _rebuilt(value, convert):
    """`value` with `convert` applied to the items of its dicts, lists and tuples (other values as they are)."""
    if isinstance(value, dict):
        return type(value)((k, convert(v)) for k, v in value.items())
    if type(value) is tuple:
        return tuple(convert(v) for v in value)
    if type(value) is list:
        return [convert(v) for v in value]
    return value
