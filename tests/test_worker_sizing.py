"""Automatic simulator worker counts stay within the host's memory (engine/sizing.py): a default that counted only
cores once asked a 128 GiB host for 96 workers of ~1.9 GB each."""
import warnings

import pytest

from vla_bench.engine import sizing

GIB = 2**30


def test_available_memory_is_read_from_proc_meminfo():
    available = sizing.available_memory()
    assert available is None or available > 64 * 2**20  # this host has far more than 64 MiB free


@pytest.mark.parametrize("available_gib, wanted, expected", [
    (128, 48, 48),    # the GPU host: 48 workers plan on 96 GiB, within 80% of 128
    (128, 96, 51),    # 96 would not fit: 0.8 * 128 / 2 = 51.2
    (24, 2, 2),       # this machine's default: one per core
    (1, 8, 1),        # never fewer than one
])
def test_auto_workers_is_the_smaller_of_cores_and_memory(available_gib, wanted, expected):
    assert sizing.auto_workers(wanted, available_gib * GIB) == expected


def test_explicit_counts_beyond_memory_are_warned_about_not_refused():
    message = sizing.memory_warning(96, 128 * GIB)
    assert "--vla-workers 96" in message and "about 51" in message and "128 GiB" in message
    assert sizing.memory_warning(48, 128 * GIB) is None


def test_the_session_caps_its_automatic_worker_count(monkeypatch):
    from vla_bench.session import EvalSession, GPU_WORKERS_PER_CORE
    from vla_bench.evaluate import EvalSettings

    created = []

    class RecordingPool:
        def __init__(self, n):
            created.append(n)
            self.n = n

    monkeypatch.setattr(sizing, "available_memory", lambda: 10 * GIB)  # room for 4 workers
    monkeypatch.setattr("vla_bench.engine.pool.WorkerPool", RecordingPool)
    session = EvalSession.__new__(EvalSession)
    session.settings = EvalSettings(workers=16, workers_auto=True)
    session._engine, session._runs, session.on_episode = None, {}, None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        session.engine()
    assert created == [1]  # no runs planned: min(workers, todo) with todo 0 -> 1
    assert session.settings.workers == 4 and GPU_WORKERS_PER_CORE == 3


def test_an_explicit_worker_count_beyond_memory_is_honoured_with_a_warning_through_the_session(monkeypatch):
    """The session path of an explicit --vla-workers: 16 workers asked for with room for 4 start 16 (the user's
    word stands) and warn, naming the count and what the memory holds; an automatic count would have been capped."""
    from types import SimpleNamespace

    from vla_bench.evaluate import EvalSettings, TaskRun
    from vla_bench.session import EvalSession

    created, added = [], []

    class RecordingPool:
        def __init__(self, n):
            created.append(n)

    class RecordingScheduler:
        def __init__(self, pool, groups, on_episode=None):
            self.pool = pool

        def add(self, job):
            added.append(job)

    monkeypatch.setattr(sizing, "available_memory", lambda: 10 * GIB)  # room for 4 workers
    monkeypatch.setattr("vla_bench.engine.pool.WorkerPool", RecordingPool)
    monkeypatch.setattr("vla_bench.engine.scheduler.Scheduler", RecordingScheduler)
    run = TaskRun.__new__(TaskRun)
    run.job = SimpleNamespace(todo=list(range(50)))  # 50 episodes planned
    session = EvalSession.__new__(EvalSession)
    session.settings = EvalSettings(workers=16, workers_auto=False)
    session._engine, session._runs, session.on_episode = None, {("expert", "libero_spatial", 0): run}, None
    with pytest.warns(UserWarning, match=r"--vla-workers 16: .* enough for about 4"):
        session.engine()
    assert created == [16] and added == [run.job]
