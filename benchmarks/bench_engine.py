"""The engine's slot groups on this machine, against one lockstep group in the same run: real LIBERO workers (no
cameras), and a stand-in model whose act() waits without using the CPU, as a GPU call does, for 20 ms + 8 ms per
row: the shape of OpenVLA-7B's kernel on an H200 (measured: 88 ms at 8 rows, 146 at 16, 213 at 24). With two groups
one group's workers simulate while the other's batch waits, at the price of twice as many, half-size calls.

    .venv/bin/python -m pytest benchmarks/bench_engine.py --benchmark-only --benchmark-group-by=group
"""
import os
import time

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")

from vla_bench.engine.pool import WorkerPool  # noqa: E402
from vla_bench.engine.scheduler import run_episodes  # noqa: E402
from vla_bench.policies.capabilities import Capabilities  # noqa: E402
from vla_bench.protocol import reference_protocol  # noqa: E402

CALL_S, ROW_S = 0.020, 0.008
WORKERS = 4
EPISODES = 4
STEPS = 30


class WaitingModel:
    """Acts from the main process like a model on a GPU: the call takes CALL_S + ROW_S per row of wall time, no CPU."""

    capabilities = Capabilities()

    def reset(self, slot, seed):
        pass

    def act(self, observations, instructions, slots):
        time.sleep(CALL_S + ROW_S * len(slots))
        actions = np.zeros((len(slots), 7))
        actions[:, 6] = -1.0
        return actions


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(WORKERS) as p:
        yield p


@pytest.mark.parametrize("groups", [1, 2], ids=["one-group (lockstep baseline)", "two-groups"])
def test_closed_loop_wall_time(benchmark, pool, groups):
    protocol = reference_protocol("libero_spatial", max_steps=STEPS)
    stats = {}

    def run():
        stats["engine"] = run_episodes(WaitingModel(), pool, protocol, 0, "pick up the black bowl",
                                       range(EPISODES), lambda o: None, groups=groups)

    benchmark.group = f"engine: {EPISODES} episodes x {STEPS} steps, {WORKERS} workers, act {CALL_S * 1000:.0f} ms + {ROW_S * 1000:.0f} ms/row"
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)  # the warm-up round builds the envs
    engine = stats["engine"]
    benchmark.extra_info["actions_per_s"] = engine.actions / benchmark.stats.stats.mean
    benchmark.extra_info["policy_busy"] = engine.busy
    assert engine.episodes == EPISODES and engine.actions == EPISODES * STEPS
