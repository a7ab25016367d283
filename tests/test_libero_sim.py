"""Real LIBERO rollouts on the CPU (MuJoCo, EGL for cameras). Each test is sized to a few episodes."""
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import sim_env
from tests.fake_pool import PoolEnv
from vla_bench.protocol import reference_protocol

pytestmark = pytest.mark.sim


def test_simulator_exception_is_that_episodes_error_and_the_env_goes_on():
    protocol = reference_protocol("libero_spatial")
    with PoolEnv(protocol, 0, 1) as env:
        assert env.reset({0: (0, 1)})[0].error is None
        bad = env.step({0: np.zeros(3)})[0]  # robosuite rejects a 3-dim action
        assert bad.obs is None and "action" in bad.error.lower()
        again = env.reset({0: (1, 2)})[0]
        assert again.error is None and env.step({0: np.zeros(7)})[0].error is None


def test_workers_prepare_the_policy_frame_in_parallel_and_it_equals_the_main_process_chain():
    """An observation_transform (OpenVLA's frame chain) runs inside each env worker - after the simulator, with
    torch imported there - and the frame it sends equals the chain run on the raw frame in this process; a policy
    with other chain settings does not take it."""
    from vla_bench.openvla.frames import FrameChain, reference_chain

    chain = FrameChain("agentview_image", flip=True, crop=True)
    protocol = reference_protocol("libero_spatial")
    with PoolEnv(protocol, 0, 2, cameras=("agentview",), transform=chain) as env:
        results = env.reset({0: (0, 1), 1: (1, 2)})
        results.update(env.step({0: np.zeros(7), 1: np.zeros(7)}))
    for result in results.values():
        made_by, frame = result.obs[FrameChain.PREPARED]
        assert made_by == chain and frame.shape == (224, 224, 3) and frame.dtype == np.uint8
        assert np.array_equal(frame, reference_chain(result.obs["agentview_image"], flip=True, crop=True))
        assert chain.frame(result.obs) is frame
        other = FrameChain("agentview_image", flip=True, crop=False)
        assert np.array_equal(other.frame(result.obs), reference_chain(result.obs["agentview_image"], True, False))


def test_frames_through_shared_memory_equal_frames_through_the_pipes():
    """The pool's arenas (engine/arena.py) change how an answer travels, not what it says: a reset and two steps
    give equal observations, every array with its dtype and shape, with and without them; and the frames are the
    main process's own copies (the next step does not change them)."""
    from vla_bench.openvla.frames import FrameChain

    chain = FrameChain("agentview_image", flip=True, crop=True)
    protocol = reference_protocol("libero_spatial")
    runs = {}
    for arenas in (True, False):
        with PoolEnv(protocol, 0, 1, cameras=("agentview",), transform=chain, arenas=arenas) as env:
            assert (env.pool.arenas[0] is not None) == arenas
            first = env.reset({0: (0, 1)})[0].obs
            kept = first["agentview_image"].copy()
            steps = [env.step({0: np.full(7, 0.3)})[0].obs for _ in range(2)]
            np.testing.assert_array_equal(first["agentview_image"], kept)
            runs[arenas] = [first, *steps]
    for with_arena, through_pipe in zip(runs[True], runs[False]):
        assert list(with_arena) == list(through_pipe)
        for key, value in through_pipe.items():
            other = with_arena[key]
            if key == FrameChain.PREPARED:
                value, other = value[1], other[1]
            if isinstance(value, np.ndarray):
                assert other.dtype == value.dtype and other.shape == value.shape, key
                np.testing.assert_array_equal(other, value, err_msg=key)


def test_an_episode_is_the_same_whatever_ran_before_it_in_the_process():
    """The same (task, init state, seed) gives the same scene after the wait steps, even when another episode
    ran first in the same env, one that moved the arm and closed the gripper (LIBERO re-places fixtures from
    NumPy's global RNG on every reset, and robosuite's soft reset keeps the gripper's integrated command). Task 5
    has the wooden cabinet, a fixture."""
    protocol = reference_protocol("libero_spatial")
    with PoolEnv(protocol, 4, 2) as env:
        first = env.reset({0: (3, protocol.episode_seed(4, 3)), 1: (7, protocol.episode_seed(4, 7))})
        for _ in range(6):
            env.step({1: np.array([0.5, 0, -0.5, 0, 0, 0, 1.0])})
        later = env.reset({1: (3, protocol.episode_seed(4, 3))})
        a, b = first[0].obs, later[1].obs
        keys = [k for k in a if k.endswith("_pos") or k.endswith("_quat")]
        assert keys and all(np.array_equal(a[k], b[k]) for k in keys)


def _ids_with_outcome(stdout: str, outcome: str) -> set[str]:
    return {line.split("[")[1].split("]")[0] for line in stdout.splitlines()
            if line.startswith(outcome) and "test_task[" in line}


def test_expert_passes_task1_and_the_negative_control_fails_it(project, tmp_path):
    result = project.run("suites/libero_spatial", "-k", "task1", "--checkpoint", "expert", "--checkpoint", "noop",
                         "--episodes", "4", "--vla-results", str(tmp_path / "r.sqlite"), "-rA")
    assert _ids_with_outcome(result.stdout, "PASSED") == {"task1-expert"}, result.stdout[-3000:]
    assert _ids_with_outcome(result.stdout, "FAILED") == {"task1-noop"}
    assert "4/4" in result.stdout and "0/4" in result.stdout  # the summary table's successes column


def _rows(db):
    if not db.exists():
        return []
    with sqlite3.connect(db) as c:
        try:
            return c.execute("SELECT init_index, created FROM episodes ORDER BY init_index").fetchall()
        except sqlite3.OperationalError:  # the table is being created
            return []


def test_a_killed_run_resumes_with_finished_episodes_skipped(project, tmp_path):
    db = tmp_path / "r.sqlite"
    args = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "suites/libero_spatial", "-k", "task1",
            "--checkpoint", "random", "--episodes", "6", "--max-steps", "30", "--vla-workers", "1",
            "--vla-results", str(db)]
    proc = subprocess.Popen(args, cwd=project.path, env=sim_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while len(_rows(db)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the pytest process and its env workers, mid-episode
    proc.wait()
    before = _rows(db)
    assert 2 <= len(before) < 6, before
    result = subprocess.run(args + ["-rA"], cwd=project.path, env=sim_env(), capture_output=True, text=True,
                            timeout=600)
    after = _rows(db)
    assert [i for i, _ in after] == list(range(6)), result.stdout[-2000:]
    assert dict(after).items() >= dict(before).items()  # the finished rows were kept, not re-run
    assert f"({len(before)} resumed)" in result.stdout


def test_video_is_written_per_episode_and_decodes(project, tmp_path):
    import imageio.v3 as iio

    result = project.run("suites/libero_spatial", "-k", "task1", "--checkpoint", "noop", "--episodes", "1",
                         "--max-steps", "5", "--video", "all", "--video-dir", str(tmp_path / "videos"),
                         "--vla-results", str(tmp_path / "r.sqlite"))
    videos = sorted((tmp_path / "videos").rglob("*.mp4"))
    assert [v.relative_to(tmp_path / "videos").as_posix() for v in videos] == \
        ["noop/libero_spatial/task1/episode000-failure.mp4"], result.stdout[-2000:]
    frames = iio.imread(videos[0])
    assert frames.shape == (6, 256, 256, 3) and frames.std() > 10  # the start + 5 steps, a real picture


def test_episodes_run_inside_workers_match_the_lockstep_engine(project):
    """The scripted expert run whole inside env workers gives the same outcome, step for step, as the batched
    lockstep engine on the same init states and seeds."""
    from vla_bench.policies import BuildContext, ModelCache, build_policy
    from vla_bench.registry import Registry
    from vla_bench.engine.pool import WorkerPool
    from vla_bench.engine.scheduler import run_episodes
    from vla_bench.policies.capabilities import Capabilities

    registry = Registry.load(project.path / "checkpoints.toml")
    expert = build_policy(registry.get("expert"), BuildContext(registry, "libero_spatial", ModelCache()))

    class Lockstep(type(expert)):  # the same expert, acting from this process in lockstep batches
        capabilities = Capabilities(privileged=True)

    lockstep = Lockstep(expert.fumble_probability, expert.action_noise, expert.motion)
    protocol = reference_protocol("libero_spatial")
    outcomes = {"lockstep": {}, "workers": {}}
    with WorkerPool(2) as pool:
        instruction = "pick up the black bowl"
        stats = run_episodes(lockstep, pool, protocol, 0, instruction, [3, 4],
                             lambda o: outcomes["lockstep"].update({o.init_index: (o.success, o.steps, o.error)}),
                             groups=2)
        run_episodes(expert, pool, protocol, 0, instruction, [3, 4],
                     lambda o: outcomes["workers"].update({o.init_index: (o.success, o.steps, o.error)}))
    assert outcomes["workers"] == outcomes["lockstep"]
    assert all(success for success, _, _ in outcomes["workers"].values())
    # every lockstep step came back with the worker's timing; the privileged expert renders no camera
    timing = stats.step_timing()
    assert timing["steps_timed"] == sum(steps for _, steps, _ in outcomes["lockstep"].values())
    assert timing["sim_ms"] > 1 and timing["render_ms"] == 0 and stats.spans > 0
