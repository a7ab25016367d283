"""What the wire costs per control step: a trivial policy (zeros) in-process, the same-run baseline, against the
same policy behind `vla-bench serve` on loopback, reached through the remote kind, in both protocols, for one env
and for a batch of 8 (one connection per env slot; the server batches them into one policy call). Observations
are what the LIBERO presets send: openpi's two 224x224 frames + state + prompt, vla-eval's one 256x256 frame +
prompt. As in the rollout engine, the env workers have already flipped and resized the frames (the mapping is
their observation transform), so the figures are the policy process's own cost per step.

    .venv/bin/python -m pytest benchmarks/bench_remote.py --benchmark-only --benchmark-group-by=group

Per-observation overhead = (remote time - in-process time) / batch size.
"""
import numpy as np
import pytest

from vla_bench.policies.remote import ActionMapping, ConnectionPool, RemotePolicy
from vla_bench.serve.client import Reliability
from vla_bench.serve.mapping import DEFAULT_PRESET, PRESETS
from vla_bench.serve.server import BackgroundServer, PolicyServer


class Zeros:
    """The trivial policy: what remains of a step's time is the wire and the bookkeeping."""

    needs_images = True
    needs_privileged = False

    def reset(self, slot, seed):
        pass

    def act(self, observations, instructions, slots):
        return np.zeros((len(slots), 7))


def observations(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"agentview_image": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
             "robot0_eye_in_hand_image": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
             "robot0_eef_pos": np.zeros(3), "robot0_eef_quat": np.array([0, 0, 0, 1.0]),
             "robot0_gripper_qpos": np.zeros(2)} for _ in range(n)]


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("where", ["in-process", "openpi", "vla-eval"])
def test_step_time(benchmark, where, batch):
    benchmark.group = f"batch of {batch}"
    obs, texts, slots = observations(batch), ["put the bowl on the plate"] * batch, list(range(batch))
    if where == "in-process":
        policy, server = Zeros(), None
    else:
        mapping = PRESETS[DEFAULT_PRESET[where]]
        # max_batch = the batch: the server runs it the moment the last request arrives
        server = BackgroundServer(PolicyServer(Zeros(), {"checkpoint": "zeros"}, where, mapping, max_batch=batch,
                                               max_wait_s=0.05))
        policy = RemotePolicy(ConnectionPool(server.url, where, Reliability()), mapping, ActionMapping())
        obs = [policy.observation_transform(o) for o in obs]  # what the env workers do before sending
    for s in slots:
        policy.reset(s, 0)
    policy.act(obs, texts, slots)  # connections opened outside the measurement
    try:
        benchmark(policy.act, obs, texts, slots)
    finally:
        if server is not None:
            policy.close()
            server.close()
