"""A served checkpoint is the same checkpoint: the tiny OpenVLA through `vla-bench serve` (either protocol) gives
the in-process actions bit for bit, and the same LIBERO episodes, episode for episode and frame for frame."""
from __future__ import annotations

import json

import numpy as np
import pytest

from test_remote import env_obs
from vla_bench.policies import BuildContext, ModelCache, build_policy
from vla_bench.policies.remote import _metadata
from vla_bench.registry import Registry
from vla_bench.serve.cli import build_server
from vla_bench.serve.server import BackgroundServer


@pytest.fixture(scope="module")
def tiny_snapshot(tmp_path_factory):
    from vla_bench.openvla import tiny

    root = tmp_path_factory.mktemp("tiny")
    return tiny.write_tiny_snapshot(root / "snap", tiny.build_tokenizer(root / "tok"), seed=0)


def entries(snapshot, remote: str = "") -> str:
    return (f'default = "tiny"\n[checkpoints.tiny]\nkind = "openvla"\nsource = {json.dumps(str(snapshot))}\n'
            f'[checkpoints.rep]\nkind = "openvla"\nsource = {json.dumps(str(snapshot))}\naction_repeat = 2\n'
            f'[thresholds.libero_spatial]\ndefault = 0.0\n' + remote)


@pytest.mark.parametrize("protocol", ["openpi", "vla-eval"])
def test_a_served_checkpoint_gives_the_in_process_actions(protocol, tiny_snapshot, checkpoints_file):
    """An action_repeat = 2 entry served and evaluated remotely: every executed action equals the in-process
    policy's on the same observations, across steps (the rule's repeats arrive as a chunk) and a reset."""
    _metadata.clear()
    reg = Registry.load(checkpoints_file(entries(tiny_snapshot)))
    cache = ModelCache()
    local = build_policy(reg.get("rep"), BuildContext(reg, "libero_spatial", cache))
    server = build_server(reg, "rep", protocol, cache=cache)  # the same model cache: one model in memory
    assert cache.loads == 1
    with BackgroundServer(server) as bg:
        # image_size = 0: frames at the render size, as the in-process policy gets them
        reg = Registry.load(checkpoints_file(entries(tiny_snapshot, (
            f'[checkpoints.remote]\nkind = "remote"\nurl = "{bg.url}"\nprotocol = "{protocol}"\nimage_size = 0\n'))))
        remote = build_policy(reg.get("remote"), BuildContext(reg, "libero_spatial", ModelCache()))
        assert remote.row_versions["server"]["metadata"]["identity"] == reg.identity(reg.get("rep"))
        instructions = ["put the bowl on the plate", "open the middle drawer of the cabinet"]
        for policy in (local, remote):
            policy.reset(0, 0)
            policy.reset(1, 0)
        for step in range(5):
            if step == 3:  # a new episode in slot 1 mid-window: both ask afresh
                local.reset(1, 1)
                remote.reset(1, 1)
            observations = [env_obs(10 * step), env_obs(10 * step + 1)]
            np.testing.assert_array_equal(remote.act(observations, instructions, [0, 1]),
                                          local.act(observations, instructions, [0, 1]))
        remote.close()
    assert local.repeater.queries == 4  # steps 0, 2, 3 (slot 1) and 4
    # openpi carries the chunk to the client; vla-eval answers one action per observation, buffering the chunk
    assert remote.repeater.queries == (4 if protocol == "openpi" else 5)


@pytest.mark.sim
def test_the_remote_kind_gives_the_in_process_libero_episodes(tiny_snapshot, checkpoints_file):
    """LIBERO-Spatial task 1, two episodes, with the tiny OpenVLA in-process and through `vla-bench serve` over
    the openpi protocol, in one simulator worker: the same outcome and steps per episode and the same frames at
    every step, so the same actions reached the simulator."""
    from vla_bench.envs.tasks import suite_tasks
    from vla_bench.engine.pool import WorkerPool
    from vla_bench.engine.scheduler import run_episodes
    from vla_bench.protocol import reference_protocol

    _metadata.clear()
    reg = Registry.load(checkpoints_file(entries(tiny_snapshot)))
    cache = ModelCache()
    local = build_policy(reg.get("tiny"), BuildContext(reg, "libero_spatial", cache))
    protocol = reference_protocol("libero_spatial", episodes=2, max_steps=4)
    runs = {}
    with BackgroundServer(build_server(reg, "tiny", "openpi", cache=cache)) as bg:
        reg = Registry.load(checkpoints_file(entries(tiny_snapshot, (
            f'[checkpoints.remote]\nkind = "remote"\nurl = "{bg.url}"\nprotocol = "openpi"\nimage_size = 0\n'
            'wrist_key = ""\nstate_key = ""\n'))))
        remote = build_policy(reg.get("remote"), BuildContext(reg, "libero_spatial", ModelCache()))
        with WorkerPool(1) as pool:
            for name, policy in (("in-process", local), ("served", remote)):
                outcomes = []
                run_episodes(policy, pool, protocol, 0, suite_tasks("libero_spatial")[0].language, [0, 1],
                             outcomes.append, record_frames=True)
                runs[name] = sorted(outcomes, key=lambda o: o.init_index)
        remote.close()
    for here, there in zip(runs["in-process"], runs["served"], strict=True):
        assert here.error is None and there.error is None
        assert (here.init_index, here.success, here.steps) == (there.init_index, there.success, there.steps)
        assert len(here.frames) == len(there.frames) == protocol.max_steps + 1
        for a, b in zip(here.frames, there.frames):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(runs["in-process"][0].frames[0], runs["in-process"][0].frames[-1])  # the arm moved
