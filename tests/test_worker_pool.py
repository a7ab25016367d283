"""The worker pool's plumbing (engine/pool.py) without a simulator: answers are read by the pool's receiver thread
while the caller is elsewhere, and a worker that dies is answered as an error and replaced."""
import os
import time

from vla_bench.engine.pool import WorkerPool


class ExitOnArrival:
    """Unpickling this in a worker ends the worker at once (a segfault or an OOM kill, as the pool sees it)."""

    def __reduce__(self):
        return os._exit, (3,)


def _until(condition, limit=30.0):
    deadline = time.monotonic() + limit
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_answers_are_read_while_the_caller_is_away():
    """Answers arrive in the pool (read off the workers' sockets) before the caller asks for them, the way they do
    while the caller waits for a GPU batch; wait then hands each over once, and busy covers them until then."""
    with WorkerPool(2) as pool:
        for slot in (0, 1):
            pool.submit(slot, "no such command", None)
        assert _until(lambda: len(pool._arrived) == 2)  # nobody called wait: the receiver read both
        assert pool.busy == {0, 1}
        answers = pool.wait()
        assert set(answers) == {0, 1} and all("unknown command" in a.error for a in answers.values())
        assert pool.busy == set() and pool.wait(timeout=0) == {}


def test_wait_for_some_slots_leaves_the_others_answers():
    with WorkerPool(2) as pool:
        for slot in (0, 1):
            pool.submit(slot, "no such command", None)
        assert _until(lambda: len(pool._arrived) == 2)
        assert set(pool.wait(slots={1})) == {1}
        assert set(pool.wait()) == {0}


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
