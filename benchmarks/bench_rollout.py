"""Expert rollout throughput on this machine, in control steps per second: without cameras (the baseline, how
the expert runs) and with one 256x256 camera (what an image policy or a video costs), measured in the same run.

    .venv/bin/python -m pytest benchmarks/bench_rollout.py --benchmark-only --benchmark-group-by=group
"""
import os

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")

from vla_bench.envs.libero import LiberoTaskEnv  # noqa: E402
from vla_bench.policies import BuildContext, ModelCache, build_policy  # noqa: E402
from vla_bench.protocol import reference_protocol  # noqa: E402
from vla_bench.registry import Registry  # noqa: E402

STEPS = 40


@pytest.fixture(scope="module")
def expert():
    registry = Registry.load()
    return build_policy(registry.get("expert"), BuildContext(registry, "libero_spatial", ModelCache()))


@pytest.mark.parametrize("cameras", [(), ("agentview",)], ids=["no-camera", "agentview-256"])
def test_expert_steps_per_second(benchmark, expert, cameras):
    protocol = reference_protocol("libero_spatial")
    env = LiberoTaskEnv(protocol, 0, cameras, privileged=True)
    instruction = env.task.language

    def setup():
        expert.reset(0, protocol.episode_seed(0, 0))
        return (env.reset(0, protocol.episode_seed(0, 0)),), {}

    def steps(obs):
        for _ in range(STEPS):
            obs, done = env.step(expert.act([obs], [instruction], [0])[0])

    benchmark.group = "expert rollout, libero_spatial task1"
    benchmark.pedantic(steps, setup=setup, rounds=3, iterations=1)
    benchmark.extra_info["steps_per_second"] = STEPS / benchmark.stats.stats.mean
    env.close()
    assert np.isfinite(benchmark.extra_info["steps_per_second"])
