"""The engine in the real simulator: the tiny OpenVLA (a model acting from the main process) and the noop control
(run inside the workers) give the same episodes, action for action, whether a session has one worker in one group
or several workers in several groups with two tasks interleaved; trajectories come back from the store."""
import numpy as np
import pytest

from tests.test_remote_openvla import entries, tiny_snapshot  # noqa: F401 (the module-scoped fixture)
from vla_bench.policies import BuildContext, ModelCache, build_policy
from vla_bench.registry import Registry
from vla_bench.results import ResultsStore
from vla_bench.session import EvalSession
from vla_bench.evaluate import EvalSettings

pytestmark = pytest.mark.sim


def _session(registry, path, workers, groups):
    settings = EvalSettings(workers=workers, groups=groups, trajectories=True)
    return EvalSession(registry, ResultsStore(path), settings, episodes=2, max_steps=3)


def _run(registry, path, workers, groups, cases):
    session = _session(registry, path, workers, groups)
    specs = [(registry.get(name), "libero_spatial", task) for name, task in cases]
    session.plan(specs)
    try:
        results = {(spec.name, task): session.evaluate(spec, suite, task) for spec, suite, task in specs}
        rows = {}
        for r in session.store.episodes():
            trajectory = session.store.trajectory(r.identity, r.suite, r.task_index, r.protocol_key, r.init_index)
            rows[(r.checkpoint, r.task_index, r.init_index)] = (r.success, r.steps, r.error, r.stop_reason,
                                                                trajectory)
        stats = session._engine.stats.as_dict() if session._engine else None
    finally:
        session.close()
    return results, rows, stats


def test_episodes_are_the_same_with_one_worker_or_several_in_groups(tiny_snapshot, checkpoints_file, tmp_path):
    registry = Registry.load(checkpoints_file(entries(tiny_snapshot) + '[checkpoints.noop]\nkind = "noop"\n'))
    cases = [("tiny", 0), ("tiny", 1), ("noop", 0)]
    _, alone, _ = _run(registry, tmp_path / "one.sqlite", 1, 1, cases)
    results, together, stats = _run(registry, tmp_path / "three.sqlite", 3, 2, cases)
    assert set(alone) == set(together) and len(alone) == 6
    for key, (success, steps, error, reason, trajectory) in alone.items():
        other = together[key]
        assert (success, steps, error, reason) == other[:4], key
        assert error is None and steps == 3
        np.testing.assert_array_equal(trajectory["actions"], other[4]["actions"])  # the same actions executed
        np.testing.assert_array_equal(trajectory["eef_pos"], other[4]["eef_pos"])
        assert trajectory["actions"].shape == (3, 7)
    model_actions = [together[("tiny", 0, i)][4]["actions"] for i in (0, 1)]
    assert not np.array_equal(*model_actions)  # the model saw each episode's own frames
    assert all(r.episodes == 2 for r in results.values())
    assert stats["actions"] == 18 and set(stats["batches"]) <= {"1", "2"}  # 3 slots in 2 groups: batches of 1-2
