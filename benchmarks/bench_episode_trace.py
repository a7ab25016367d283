"""The cost of recording what happens inside an episode: `EpisodeTrace.add` per control step, and a whole 220-step
episode (LIBERO-Spatial's limit) with its summary, with and without the per-step trajectory and its npz blob.

    python3 -m pytest benchmarks/bench_episode_trace.py

Measured on the 2-core development host, shared with other jobs (2026-12-04, pytest-benchmark medians): 28 us per
step; 14 ms per episode with the figures alone, 17 ms with the trajectory and its blob. A scripted-expert step on
the same host costs ~30 ms (simulator and expert: 2.4 s for an 80-step episode), so the trace adds ~0.1-0.2%. An
80-step expert episode packs into ~5 KB.
"""
import numpy as np
import pytest

from vla_bench.engine.trace import EpisodeTrace

OBS = {"robot0_eef_pos": np.array([-0.21, 0.0, 1.17]), "robot0_eef_quat": np.array([1.0, 0.0, 0.0, 0.0]),
       "robot0_gripper_qpos": np.array([0.04, -0.04])}
ACTION = np.r_[np.full(6, 0.3), -1.0]


def test_add_one_step(benchmark):
    trace = EpisodeTrace(keep_steps=False)
    benchmark(trace.add, ACTION, OBS)


@pytest.mark.parametrize("keep_steps", [False, True], ids=["figures", "trajectory"])
def test_one_220_step_episode(benchmark, keep_steps):
    def episode():
        trace = EpisodeTrace(keep_steps)
        for _ in range(220):
            trace.add(ACTION, OBS)
        return trace.finish(False, 220, 220, None), trace.to_blob()

    summary, blob = benchmark(episode)
    assert summary.stop_reason == "stalled" and (blob is not None) == keep_steps
