"""The worker pool's plumbing (engine/pool.py, engine/arena.py): answers' large arrays through shared memory, a dead
worker answered as an error and replaced."""
import os
from collections import OrderedDict

import numpy as np
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from vla_bench.engine import arena as arena_module
from vla_bench.engine.arena import ARENA_BYTES, INLINE_BELOW, Arena, InArena
from vla_bench.engine.pool import WorkerPool

dtypes = st.sampled_from([np.uint8, np.float32, np.float64, np.int64, ">i4", np.bool_])
arrays = dtypes.flatmap(lambda d: hnp.arrays(d, hnp.array_shapes(max_dims=3, max_side=160)))
leaves = arrays | st.integers() | st.text(max_size=5) | st.none()
observations = st.recursive(leaves, lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
                            | st.dictionaries(st.text(max_size=4), inner, max_size=4), max_leaves=8)


def assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, (dict, list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a.values(), b.values()) if isinstance(a, dict) else zip(a, b):
            assert_same(x, y)
        if isinstance(a, dict):
            assert list(a) == list(b)
    else:
        assert a == b


@settings(max_examples=60, deadline=None)
@given(observations)
def test_an_observation_comes_out_of_the_arena_as_it_went_in(obs):
    """For any nesting of dicts, lists and tuples of arrays (any dtype, byte order and shape) and plain values,
    what the worker packs into its arena the main process unpacks equal, with every array its own copy: the arena
    can take the slot's next answer without changing the last one."""
    worker = Arena(create=True)
    main = Arena(worker.name)  # attached by name, as the other process does
    try:
        packed = worker.pack(obs)
        out = main.unpack(packed)
        assert_same(out, obs)
        worker.bytes[:] = 0xAB  # the next answer overwrites the arena
        assert_same(out, obs)
    finally:
        main.close()
        worker.close()


def test_large_arrays_go_by_reference_small_ones_and_overflow_inline():
    arena = Arena(create=True)
    try:
        frame = np.arange(256 * 256 * 3, dtype=np.uint8).reshape(256, 256, 3)
        state = np.zeros(9)
        big = np.zeros(ARENA_BYTES, np.uint8)  # does not fit after the frame
        packed = arena.pack(OrderedDict(image=frame, state=state, prepared=("chain", frame[:224, :224]), big=big))
        assert isinstance(packed, OrderedDict)
        assert isinstance(packed["image"], InArena) and isinstance(packed["prepared"][1], InArena)
        assert packed["state"] is state and packed["big"] is big and state.nbytes < INLINE_BELOW
        assert packed["prepared"][1].offset % 64 == 0 and packed["prepared"][1].offset >= frame.nbytes
    finally:
        arena.close()


def test_no_arenas_where_dev_shm_is_too_small(monkeypatch):
    """A container's small /dev/shm (docker's default is 64 MB) would kill workers writing past it: the pool then
    sends everything through the pipes."""
    class Tiny:
        f_bavail, f_frsize = 64 << 20 >> 12, 4096
    monkeypatch.setattr(arena_module.os, "statvfs", lambda path: Tiny())
    assert arena_module.fits_in_shm(32) and not arena_module.fits_in_shm(48)


class ExitOnArrival:
    """Unpickling this in a worker ends the worker at once (a segfault or an OOM kill, as the pool sees it)."""

    def __reduce__(self):
        return os._exit, (3,)


def test_a_dead_worker_is_answered_as_an_error_and_replaced():
    """A worker that dies is its command's answer (an error naming the exit code), and the slot's new worker serves
    the next command."""
    with WorkerPool(1) as pool:
        pool.keep(0, "poison", ExitOnArrival())
        pool.submit(0, "no such command", None)
        answers = pool.wait(timeout=60)
        assert "simulator worker died (exit code 3)" in answers[0].error
        pool.submit(0, "no such command", None)
        assert "unknown command" in pool.wait(timeout=60)[0].error
