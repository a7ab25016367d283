"""Scene fingerprints: the shipped reference poses, the check, `vla-bench doctor`, and the verdict on every episode."""
from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vla_bench import doctor
from vla_bench.envs import fingerprint
from vla_bench.envs.tasks import init_states, suite_tasks
from vla_bench.protocol import LIBERO_SUITES, reference_protocol

BOWL = "akita_black_bowl_1"


@pytest.fixture(scope="module")
def prints():
    return fingerprint.Fingerprints()


def test_fingerprints_cover_every_suite_task_and_init_state(prints):
    """The shipped file holds one settled pose per object for every official init state of every task."""
    for suite in LIBERO_SUITES:
        for task in range(len(suite_tasks(suite))):
            names, poses = prints.reference(suite, task, len(init_states(suite, task)) - 1)
            assert len(names) == len(poses) >= 2
            assert prints.reference(suite, task, len(init_states(suite, task))) is None
    assert prints.meta["versions"]["mujoco"] == "2.3.7" and prints.meta["versions"]["robosuite"] == "1.4.0"
    for suite in LIBERO_SUITES:  # a reference frame is a picture of the scene, not a blank
        assert prints.frame(suite).shape == (64, 64, 3) and prints.frame(suite).std() > 20


@pytest.mark.sim
def test_this_stack_renders_the_reference_frame(prints):
    """An agentview frame rendered here by an evaluation env (its own GL context, after the renderer was named)
    matches the stored reference frame; a blank or moved frame would be tens of levels off."""
    figures = doctor.check_rendering(prints, ["libero_spatial"], workers=1)
    assert figures["libero_spatial"]["ok"] and figures["libero_spatial"]["mean_abs_diff"] < 1.0
    assert figures["libero_spatial"]["renderer"].startswith("egl: ")


def test_reference_task6_bowl_is_seated_on_the_ramekin(prints):
    """On the reference stack libero_spatial task6's bowl settles on the ramekin, 1.45 cm off its centre and 3.5 cm
    above it, in every init state (the scene that mujoco >= 3.4 no longer reproduces)."""
    for init in range(50):
        names, poses = prints.reference("libero_spatial", 5, init)
        bowl, ramekin = poses[names.index(BOWL)], poses[names.index("glazed_rim_porcelain_ramekin_1")]
        assert np.linalg.norm(bowl[:2] - ramekin[:2]) == pytest.approx(0.0145, abs=0.001)
        assert bowl[2] - ramekin[2] == pytest.approx(0.0351, abs=0.001)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-2, 2), min_size=3, max_size=3), st.lists(st.floats(-1, 1), min_size=4, max_size=4))
def test_stored_poses_are_within_a_tenth_of_a_millimetre(position, quat):
    """Quantizing a pose for storage moves it by at most 0.1 mm and rotates it by at most 0.05 degrees, far inside
    the check's 5 mm / 5 degree tolerance."""
    q = np.array(quat)
    if np.linalg.norm(q) < 0.1:
        q = np.array([1.0, 0, 0, 0])
    pose = np.concatenate([position, q / np.linalg.norm(q)])[None]
    distance, angle = fingerprint.pose_differences(pose, fingerprint.dequantize(*fingerprint.quantize(pose)))
    assert distance[0] <= 1e-4 and angle[0] <= 0.05


def test_check_names_what_moved_and_ignores_small_noise(prints):
    names, poses = prints.reference("libero_spatial", 0, 7)
    noisy = poses.copy()
    noisy[:, :3] += 0.002  # 3.5 mm: within tolerance
    assert prints.check("libero_spatial", 0, 7, names, noisy).status == "match"
    moved = poses.copy()
    moved[names.index(BOWL), 0] += 0.02
    verdict = prints.check("libero_spatial", 0, 7, names, moved)
    assert verdict.status == "mismatch" and BOWL in verdict.detail and "2.0 cm" in verdict.detail
    assert prints.check("libero_spatial", 0, 7, names[::-1], poses[::-1]).status == "mismatch"  # other objects


def test_a_darker_floor_fails_the_render_check(prints):
    """The stored frame upscaled back to full size passes; the same frame 15% darker (mujoco 3.3.3 drew
    LIBERO-Object's floor darker, measured at 36 levels) does not."""
    reference = prints.frame("libero_object")
    frame = np.repeat(np.repeat(reference, fingerprint.RENDER_DOWNSCALE, 0), fingerprint.RENDER_DOWNSCALE, 1)
    assert fingerprint.render_difference(reference, frame) < 0.5
    darker = (frame * 0.85).astype(np.uint8)
    assert fingerprint.render_difference(reference, darker) > fingerprint.RENDER_TOLERANCE


def test_spread_and_ranges():
    assert doctor.spread(50, None) == list(range(50))
    assert doctor.spread(50, 3) == [0, 24, 49] or doctor.spread(50, 3) == [0, 25, 49]
    assert doctor.spread(5, 9) == [0, 1, 2, 3, 4]
    assert doctor._ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"


def settle_with_bowl_moved(suite: str, task: int, inits):
    """fingerprint.settle_task, with the target bowl shifted 2 cm along x in every init state vector."""
    from vla_bench.envs.libero import LiberoTaskEnv

    protocol = reference_protocol(suite)
    env = LiberoTaskEnv(protocol, task)
    try:
        robosuite_env = env.env.env
        joint = robosuite_env.objects_dict[BOWL].joints[-1]
        start = robosuite_env.sim.model.get_joint_qpos_addr(joint)[0]
        states = np.array(env.init_states, dtype=np.float64)
        states[:, 1 + start] += 0.02  # the flattened state is [time, qpos..., qvel...]
        env.init_states = states
        poses = []
        for init in inits:
            env.reset(init, protocol.episode_seed(task, init))
            names, pose = fingerprint.body_poses(robosuite_env)
            poses.append(pose)
        return names, np.stack(poses)
    finally:
        env.close()


@pytest.mark.sim
def test_this_stack_matches_the_fingerprints_on_a_sample_of_every_suite(prints):
    """CI's simulator stack settles a sample of init states of every suite (one task each, two init states) as
    the reference stack did."""
    jobs = [(suite, k * 2 % len(suite_tasks(suite)), [0, 37]) for k, suite in enumerate(LIBERO_SUITES)]
    lines = []
    figures = doctor.check_scenes(prints, jobs, workers=2, report=lines.append)
    assert lines == []
    for suite, task, _ in jobs:
        entry = figures[suite][f"task{task + 1}"]
        assert entry["mismatched"] == [] and entry["worst_distance_m"] < 0.001


@pytest.mark.sim
def test_a_bowl_moved_by_hand_is_named_with_its_task_and_init_states(prints):
    lines = []
    figures = doctor.check_scenes(prints, [("libero_spatial", 0, [3, 4])], workers=1, report=lines.append,
                                  settle=settle_with_bowl_moved)
    assert figures["libero_spatial"]["task1"]["mismatched"] == [3, 4]
    assert len(lines) == 1 and "libero_spatial task1: 2/2 init states differ (3-4)" in lines[0] and BOWL in lines[0]


def test_old_results_stores_gain_the_scene_check_column(tmp_path):
    """A store written before rows carried the scene verdict opens, keeps its rows and stores new verdicts."""
    from vla_bench.results import EpisodeRecord, ResultsStore

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE episodes (checkpoint TEXT NOT NULL, identity TEXT NOT NULL, suite TEXT NOT NULL, "
               "task_index INTEGER NOT NULL, task_name TEXT NOT NULL, init_index INTEGER NOT NULL, seed INTEGER NOT "
               "NULL, protocol_key TEXT NOT NULL, protocol TEXT NOT NULL, success INTEGER NOT NULL, steps INTEGER "
               "NOT NULL, error TEXT, wall_s REAL NOT NULL, versions TEXT NOT NULL, render_backend TEXT NOT NULL, "
               "device TEXT NOT NULL, video TEXT, created REAL NOT NULL, "
               "PRIMARY KEY (identity, suite, task_index, protocol_key, init_index))")
    db.execute("INSERT INTO episodes VALUES ('e', 'id', 'libero_spatial', 0, 't', 0, 1, 'k', '{}', 1, 5, NULL, 1.0, "
               "'{}', 'egl', 'cpu', NULL, 0.0)")
    db.commit()
    db.close()
    store = ResultsStore(path)
    assert store.episodes()[0].scene_check is None
    store.add(EpisodeRecord("e", "id", "libero_spatial", 0, "t", 1, 2, "k", {}, True, 5, None, 1.0, {}, "egl", "cpu",
                            scene_check="match"))
    assert [r.scene_check for r in store.episodes()] == [None, "match"]


@pytest.mark.sim
def test_an_evaluation_reset_reports_that_its_scene_matches():
    from tests.fake_pool import PoolEnv

    protocol = reference_protocol("libero_spatial")
    with PoolEnv(protocol, 0, 1) as env:
        result = env.reset({0: (11, protocol.episode_seed(0, 11))})[0]
    assert result.error is None and result.scene_check == "match"


@pytest.mark.sim
def test_rows_carry_a_moved_scene_and_strict_sim_fails_the_task(project, tmp_path, prints, checkpoints_file):
    """With a fingerprint file whose task1 bowl sits 2 cm away (as if this stack had moved it), every row says
    so and the summary warns; --vla-strict-sim turns the warning into the task's failure."""
    from conftest import sim_env

    arrays = dict(prints.arrays, meta=np.array(__import__("json").dumps(prints.meta)))
    names = [str(n) for n in arrays["libero_spatial/0/names"]]
    positions = arrays["libero_spatial/0/positions"].copy()
    positions[:, names.index(BOWL), 0] += 200  # units of 0.1 mm
    arrays["libero_spatial/0/positions"] = positions
    doctored = tmp_path / "moved.npz"
    np.savez(doctored, **arrays)
    toml = checkpoints_file('default = "noop"\n[thresholds.libero_spatial]\ndefault = 0.0\n'
                            '[checkpoints.noop]\nkind = "noop"\n')
    env = sim_env(VLA_BENCH_FINGERPRINTS=str(doctored))
    args = ["suites/libero_spatial", "-k", "task1", "--checkpoints-file", str(toml), "--episodes", "2",
            "--max-steps", "2", "--vla-workers", "1", "-rA"]
    lenient = project.run(*args, "--vla-results", str(tmp_path / "a.sqlite"), env=env)
    assert lenient.returncode == 0, lenient.stdout[-3000:]
    assert "WARNING libero_spatial task1 noop: 2 episode(s) started from a scene that differs" in lenient.stdout
    with sqlite3.connect(tmp_path / "a.sqlite") as db:
        verdicts = [v for (v,) in db.execute("SELECT scene_check FROM episodes ORDER BY init_index")]
    assert len(verdicts) == 2 and all(v.startswith(f"mismatch: {BOWL} 2.0 cm") for v in verdicts), verdicts
    strict = project.run(*args, "--vla-strict-sim", "--vla-results", str(tmp_path / "b.sqlite"), env=env)
    assert strict.returncode == 1 and "FAILED" in strict.stdout
    assert "differs from the reference simulator stack (init 0:" in strict.stdout
