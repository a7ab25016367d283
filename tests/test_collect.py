"""`vla-bench collect` on the real simulator: expert demos written in LIBERO's layout, read back, resumed.

Rendering costs ~0.2 s per camera per step on a CPU, so the full-episode test records physics only and the
image test records a few steps at 64x64 through the same worker the collector uses.
"""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from vla_bench.collect.runner import collect, demo_seed
from vla_bench.collect.writer import FAILED_ATTR, task_file
from vla_bench.data.libero_hdf5 import libero_episodes, read_libero_demos, write_libero_demos

pytestmark = pytest.mark.sim

SUITE = "libero_spatial"


@pytest.fixture(autouse=True)
def _sim_env(monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "egl")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")


def test_collect_two_demos_reads_back_and_resumes(tmp_path):
    summary = collect(SUITE, [0], 2, tmp_path, workers=1, seed=3, cameras=())
    task = summary.tasks[0]
    assert summary.complete and task.kept == 2 and task.new == 2
    assert task.path == task_file(tmp_path, SUITE, task.path.name[: -len("_demo.hdf5")])

    demos = list(read_libero_demos(task.path))
    assert len(demos) == 2
    from vla_bench.envs.tasks import init_states, suite_tasks

    language = suite_tasks(SUITE)[0].language
    evaluation_states = init_states(SUITE, 0)
    with h5py.File(task.path, "r") as f:
        seeds = [int(f["data"][f"demo_{i}"].attrs["seed"]) for i in range(2)]
        failed = json.loads(f["data"].attrs[FAILED_ATTR])
    # the demos are the first successful attempts of the seed sequence, in attempt order
    sequence = [demo_seed(3, 0, j) for j in range(len(seeds) + len(failed))]
    assert [s for s in sequence if s not in failed] == seeds
    for demo in demos:
        steps, meta = demo["steps"], demo["episode_metadata"]
        assert meta["language_instruction"] == language
        actions = steps["action"]
        assert actions.shape[1] == 7 and 10 < len(actions) <= 220
        assert np.all(np.abs(actions) <= 1.0)
        assert set(np.unique(actions[:, 6])) <= {-1.0, 1.0}  # the expert commands the gripper open or closed
        obs = steps["observation"]
        assert obs["ee_states"].shape == (len(actions), 6)
        assert obs["gripper_states"].shape == (len(actions), 2)
        assert obs["joint_states"].shape == (len(actions), 7)
        assert steps["sim_state"].shape[0] == len(actions)
        assert steps["is_last"][-1] and not steps["is_last"][:-1].any()
        # a fresh random placement, not one of the 50 evaluation init states (that would leak the test set)
        init = meta["init_state"]
        assert init.shape == evaluation_states.shape[1:]
        assert np.min(np.abs(evaluation_states - init).max(axis=1)) > 1e-3
    assert not np.allclose(demos[0]["episode_metadata"]["init_state"], demos[1]["episode_metadata"]["init_state"])

    # a second run with a higher target keeps the two demos and adds only what is missing
    before = [d["steps"]["action"] for d in demos]
    again = collect(SUITE, [0], 3, tmp_path, workers=1, seed=3, cameras=())
    assert again.tasks[0].resumed == 2 and again.tasks[0].new == 1 and again.complete
    after = list(read_libero_demos(task.path))
    assert len(after) == 3
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b["steps"]["action"])


def test_worker_records_both_cameras(tmp_path):
    """A few steps through the engine's worker pool as collect drives it, with both cameras at 64x64: images are
    stored per step as LIBERO stores them and come back through the readers."""
    from vla_bench.engine.episode import EpisodeRequest
    from vla_bench.engine.pool import EnvSpec, WorkerPool
    from vla_bench.policies.scripted import ScriptedExpert
    from vla_bench.protocol import reference_protocol
    import dataclasses

    protocol = dataclasses.replace(reference_protocol(SUITE, max_steps=4), camera_size=64)
    with WorkerPool(1) as pool:
        pool.keep(0, "expert", ScriptedExpert())
        pool.submit(0, "episode", EnvSpec(protocol, 0, ("agentview", "robot0_eye_in_hand"), True), "expert", None,
                    EpisodeRequest(None, 11, "the instruction", 4, demo=True))
        answers = pool.wait(timeout=180)
    assert answers, "the worker gave no answer in 180 s"
    assert answers[0].error is None, answers[0].error
    outcome = answers[0].episode
    result = {"success": outcome.success, "episode": outcome.demo}
    episode = result["episode"]
    assert not result["success"] and len(episode["actions"]) == 4
    for name in ("agentview_rgb", "eye_in_hand_rgb"):
        frames = episode["obs"][name]
        assert frames.shape == (4, 64, 64, 3) and frames.dtype == np.uint8
        assert frames.std() > 1.0  # a rendered scene, not a blank buffer
    # the two cameras see different things
    assert np.abs(episode["obs"]["agentview_rgb"].astype(int) - episode["obs"]["eye_in_hand_rgb"]).mean() > 5

    path = write_libero_demos(tmp_path / "x_demo.hdf5", [episode], "the instruction")
    (gt,) = libero_episodes(path)
    np.testing.assert_array_equal(gt["image"], episode["obs"]["agentview_rgb"])
    np.testing.assert_array_equal(gt["wrist_image"], episode["obs"]["eye_in_hand_rgb"])
    assert gt["state"].shape == (4, 8)


def test_a_file_from_an_older_random_reset_is_not_resumed(tmp_path):
    """Demos recorded under other random-reset semantics (envs/libero.py RANDOM_RESET_VERSION) started from other
    scenes: resuming into such a file would mix them, so collect refuses and names the file; a fresh file records
    the current version."""
    from vla_bench.collect.writer import RESET_ATTR, open_task_file
    from vla_bench.envs.libero import RANDOM_RESET_VERSION
    from vla_bench.envs.tasks import suite_tasks
    from vla_bench.errors import VlaBenchError

    task = suite_tasks(SUITE)[0]
    path = tmp_path / "t_demo.hdf5"
    assert open_task_file(path, task, SUITE, {}) == (0, set(), set())
    with h5py.File(path, "r") as f:
        assert int(f["data"].attrs[RESET_ATTR]) == RANDOM_RESET_VERSION
    assert open_task_file(path, task, SUITE, {}) == (0, set(), set())  # the current version resumes
    with h5py.File(path, "a") as f:  # as a file written before the version was recorded, with one attempt in it
        del f["data"].attrs[RESET_ATTR]
        f["data"].attrs[FAILED_ATTR] = "[12345]"
    with pytest.raises(VlaBenchError, match="t_demo.hdf5.*random-reset version 1.*delete the file"):
        open_task_file(path, task, SUITE, {})


def test_action_noise_executes_perturbed_actions_and_records_the_experts(tmp_path):
    """Under --action-noise the simulator runs the perturbed arm actions (stored as executed_actions) while `actions`
    keeps the expert's own commands: the two differ on the arm, agree on the gripper, stay in range, and the file
    records sigma, so a resume with another sigma is refused."""
    from vla_bench.collect.writer import NOISE_ATTR, open_task_file
    from vla_bench.envs.tasks import suite_tasks
    from vla_bench.errors import VlaBenchError

    summary = collect(SUITE, [5], 1, tmp_path, workers=1, seed=0, cameras=(), action_noise=0.1)
    task = summary.tasks[0]
    assert summary.complete and task.kept == 1
    with h5py.File(task.path, "r") as f:
        assert float(f["data"].attrs[NOISE_ATTR]) == 0.1
        demo = f["data"]["demo_0"]
        clean, executed = demo["actions"][:], demo["executed_actions"][:]
        assert float(demo.attrs["action_noise"]) == 0.1
    assert clean.shape == executed.shape and np.all(np.abs(executed) <= 1.0)
    np.testing.assert_array_equal(clean[:, 6], executed[:, 6])
    noise = executed[:, :6] - clean[:, :6]
    assert np.all(np.abs(noise).max(axis=1) > 0)  # every step is perturbed
    assert 0.05 < noise.std() < 0.15  # sigma 0.1, a little less where clipping bites
    with pytest.raises(VlaBenchError, match="--action-noise 0.1, not 0"):
        open_task_file(task.path, suite_tasks(SUITE)[5], SUITE, {}, action_noise=0.0)
    assert open_task_file(task.path, suite_tasks(SUITE)[5], SUITE, {}, action_noise=0.1)[0] == 1


def test_a_demo_replays_in_the_evaluation_env_frame_for_frame(tmp_path):
    """The env that evaluation runs reproduces a collected demo exactly: from the demo's seed, its recorded actions
    give the same camera frame at every step and succeed at the same step. So a policy that imitates the demos
    well open loop sees, in closed loop, the observations the demos showed it (until its own actions differ)."""
    import dataclasses

    from vla_bench.envs.libero import LiberoTaskEnv
    from vla_bench.protocol import reference_protocol

    summary = collect(SUITE, [5], 1, tmp_path, workers=1, seed=0, cameras=("agentview",), camera_size=64)
    with h5py.File(summary.tasks[0].path, "r") as f:
        demo = f["data"]["demo_0"]
        actions, frames, seed = demo["actions"][:], demo["obs"]["agentview_rgb"][:], int(demo.attrs["seed"])
    env = LiberoTaskEnv(dataclasses.replace(reference_protocol(SUITE), camera_size=64), 5, ("agentview",))
    try:
        obs, _ = env.reset_random(seed)
        done_at = None
        for t, action in enumerate(actions):
            np.testing.assert_array_equal(obs["agentview_image"], frames[t], err_msg=f"frame {t}")
            rendered = env.render_s
            obs, done = env.step(action)
            assert env.render_s > rendered  # the step's camera render is timed (the engine's step timing)
            if done:
                done_at = t
                break
    finally:
        env.close()
    assert done_at == len(actions) - 1
