"""What happened inside an episode (issue 18, section 9): the action statistics, stop reasons, trajectories in the
store, and the summary table's columns. No simulator: the episodes are built by hand."""
from __future__ import annotations

import dataclasses
import io
import sqlite3

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from rich.console import Console

from vla_bench.data.libero_hdf5 import write_libero_demos
from vla_bench.demonstrations import figures_by_instruction, task_demonstration_figures
from vla_bench.engine.trace import (STALL_DISTANCE, STALL_STEPS, WORKSPACE_HIGH, EpisodeSummary, EpisodeTrace,
                                    last_phase)
from vla_bench.metrics.episode_figures import ARM_DEAD_ZONE, ActionFigures, action_figures, task_figures
from vla_bench.policies.base import ReportsPhase
from vla_bench.policies.scripted import ScriptedExpert
from vla_bench.report import closed_loop_summary, results_from_records, task_table
from vla_bench.results import EpisodeRecord, ResultsStore

#: where the hand starts on LIBERO's kitchen tables (reference/LIBERO.md)
START = np.array([-0.21, 0.0, 1.17])

#: a hand-built episode: per step (action, what it is)
EPISODE = np.array([
    [0.5, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0],       # moves; gripper open
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0],       # no motion
    [0.01, -0.01, 0.0, 0.015, 0.0, 0.0, 1.0],   # every arm value inside the dead zone (4/255); closes: switch 1
    [0.3, 0.4, 0.0, 0.0, 0.0, 0.0, 0.0],        # moves; gripper command 0 has no sign: no switch
    [0.0, 0.0, 0.02, 0.0, 0.0, 0.0, 1.0],       # 0.02 is outside the dead zone: a motion; still closed
    [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -1.0],       # opens: switch 2
])


def obs(pos, **extra) -> dict:
    return {"robot0_eef_pos": np.asarray(pos, float), "robot0_eef_quat": np.array([1.0, 0.0, 0.0, 0.0]),
            "robot0_gripper_qpos": np.array([0.04, -0.04]), **extra}


def run(positions, actions=None, keep_steps=False) -> EpisodeTrace:
    trace = EpisodeTrace(keep_steps)
    for t, pos in enumerate(positions):
        trace.add(np.zeros(7) if actions is None else actions[t], None if pos is None else obs(pos))
    return trace


# ---- the statistics -------------------------------------------------------------------------------------------
def test_the_statistics_of_a_hand_built_episode_match_plain_numpy():
    trace = run([START] * len(EPISODE), EPISODE)
    summary = trace.finish(False, len(EPISODE), 220, None)
    assert ARM_DEAD_ZONE == pytest.approx(np.full(6, 4 / 255))  # two OpenVLA bins over LIBERO's [-1, 1]
    assert summary.arm_magnitude == pytest.approx(np.linalg.norm(EPISODE[:, :6], axis=1).mean())
    assert summary.arm_magnitude == pytest.approx((0.5 + 0 + np.sqrt(0.0001 * 2 + 0.015 ** 2) + 0.5 + 0.02
                                                   + np.sqrt(6)) / 6)
    assert summary.near_zero == pytest.approx(2 / 6)
    assert summary.gripper_switches == 2
    assert action_figures(EPISODE) == ActionFigures(summary.arm_magnitude, summary.near_zero, 2)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 40), st.just(7)),
                  elements=st.sampled_from([-1.0, -0.5, -0.01, 0.0, 0.01, 0.3, 1.0])))
def test_the_running_trace_agrees_with_the_whole_array_figures(actions):
    """Adding an episode's actions step by step gives the same figures as computing them over the whole array."""
    trace = run([START] * len(actions), actions)
    summary = trace.finish(True, len(actions), 220, None)
    whole = action_figures(actions)
    assert (summary.arm_magnitude, summary.near_zero) == pytest.approx((whole.arm_magnitude, whole.near_zero))
    assert summary.gripper_switches == whole.gripper_switches


def test_an_action_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match=r"\(7,\) action"):
        EpisodeTrace().add(np.zeros(6), obs(START))


# ---- stop reasons ---------------------------------------------------------------------------------------------
def moving(steps, step=np.array([0.002, 0.0, 0.0]), start=START):
    return [start + t * step for t in range(steps)]


def test_outcomes_come_before_motion():
    still = run([START] * 50)
    assert still.finish(True, 50, 220, None).stop_reason == "success"
    assert still.finish(False, 50, 220, "MuJoCo instability").stop_reason == "error"
    assert still.finish(True, 50, 220, "policy crashed").stop_reason == "error"


def test_the_expert_names_its_last_phase():
    assert run([START] * 50).finish(False, 220, 220, None, phase="lift").stop_reason == "phase: lift"
    assert run([START] * 50).finish(True, 50, 220, None, phase="done").stop_reason == "success"


def test_a_hand_that_stops_moving_has_stalled():
    # it moves 2 mm per step, then stands still for the last STALL_STEPS + 1 positions
    positions = moving(100) + [moving(100)[-1]] * (STALL_STEPS + 1)
    assert run(positions).finish(False, 220, 220, None).stop_reason == "stalled"


def test_stalled_means_less_than_the_stated_distance_over_the_last_steps():
    almost = STALL_DISTANCE * 0.9 / STALL_STEPS
    over = STALL_DISTANCE * 1.1 / STALL_STEPS
    assert run(moving(60, np.array([0.0, almost, 0.0]))).finish(False, 60, 60, None).stop_reason == "stalled"
    assert run(moving(60, np.array([0.0, over, 0.0]))).finish(False, 60, 60, None).stop_reason == "out of steps"
    # too short an episode to tell
    assert run([START] * STALL_STEPS).finish(False, STALL_STEPS, STALL_STEPS, None).stop_reason == "out of steps"


def test_a_hand_that_keeps_moving_ran_out_of_steps():
    assert run(moving(220)).finish(False, 220, 220, None).stop_reason == "out of steps"
    assert run(moving(50)).finish(False, 50, 220, None).stop_reason == "ended at step 50 of 220"


def test_leaving_the_box_around_the_start_is_named_even_if_the_hand_then_stalls_out_there():
    # 1 cm per step sideways for 60 steps: 0.6 m, past the table's side; then pinned there
    positions = moving(60, np.array([0.0, 0.01, 0.0])) + [START + [0.0, 0.6, 0.0]] * 30
    assert np.max(np.stack(positions) - START, axis=0)[1] > WORKSPACE_HIGH[1]
    assert run(positions).finish(False, 220, 220, None).stop_reason == "left workspace"
    # rearing up over every fixture
    assert run(moving(50, np.array([0.0, 0.0, 0.01]))).finish(False, 50, 50, None).stop_reason == "left workspace"


def test_the_box_follows_the_scene_a_floor_scene_is_not_outside():
    """LIBERO-Object's hand starts 0.92 m lower than on the tables; reaching down to its objects is in the box."""
    floor_start = np.array([-0.15, 0.0, 0.25])
    positions = moving(24, np.array([0.01, 0.005, -0.01]), start=floor_start)  # down to z 0.02, out 24 cm
    assert run(positions).finish(False, 24, 24, None).stop_reason == "out of steps"


def test_observations_without_the_pose_are_tolerated():
    trace = run([None] * 30 + [START] * 5, keep_steps=True)
    assert trace.finish(False, 35, 35, None).stop_reason == "out of steps"  # the stall cannot be told
    arrays = EpisodeTrace.from_blob(trace.to_blob())
    assert np.isnan(arrays["eef_pos"][:30]).all() and np.isnan(arrays["gripper"][:30]).all()
    assert arrays["eef_pos"][30:] == pytest.approx(np.tile(START, (5, 1)))


def test_an_episode_without_steps_has_no_figures():
    summary = EpisodeTrace().finish(False, 0, 220, "reset failed")
    assert summary == EpisodeSummary(None, None, 0, "error")


# ---- the scripted expert's phase ------------------------------------------------------------------------------
def test_the_expert_reports_its_last_phase_until_the_slot_is_reset():
    from test_scripted_expert import obs_at, spatial_scene

    expert = ScriptedExpert()
    assert isinstance(expert, ReportsPhase)
    expert.reset(2, 7)
    trace = EpisodeTrace()
    for _ in range(3):  # the episode ends (out of steps) in the approach
        o = obs_at([-0.21, 0.0, 1.17], spatial_scene())
        trace.add(expert.act([o], ["pick"], [2])[0], o)
    assert last_phase(expert, 2) == "approach"
    assert trace.finish(False, 3, 3, None, phase=last_phase(expert, 2)).stop_reason == "phase: approach"
    expert.reset(2, 8)  # the slot's next episode
    assert last_phase(expert, 2) == "start"


def test_other_policies_have_no_phase():
    from vla_bench.policies.controls import NoopPolicy

    assert last_phase(NoopPolicy(), 0) is None


# ---- the store ------------------------------------------------------------------------------------------------
def record(init_index=0, success=False, error=None, summary: EpisodeSummary | None = None, **kwargs) -> EpisodeRecord:
    fields = dataclasses.asdict(summary) if summary else {}
    return EpisodeRecord("model", "id", "libero_spatial", 0, "t", init_index, init_index, "k", {}, success, 220,
                         error, 1.0, {}, "egl", "cpu", **fields, **kwargs)


def test_trajectories_round_trip_through_the_store(tmp_path):
    trace = run(moving(40), np.tile(EPISODE, (7, 1))[:40], keep_steps=True)
    summary = trace.finish(False, 40, 40, None)
    store = ResultsStore(tmp_path / "r.sqlite")
    store.add(record(0, summary=summary), trajectory=trace.to_blob())
    store.add(record(1, summary=summary))  # without --vla-trajectories
    stored = store.trajectory("id", "libero_spatial", 0, "k", 0)
    assert {k: (v.shape, v.dtype) for k, v in stored.items()} == {
        "actions": ((40, 7), np.float32), "eef_pos": ((40, 3), np.float32), "eef_quat": ((40, 4), np.float32),
        "gripper": ((40, 2), np.float32)}
    assert stored["actions"] == pytest.approx(np.tile(EPISODE, (7, 1))[:40])
    assert stored["eef_pos"] == pytest.approx(np.stack(moving(40)), abs=1e-6)
    assert store.trajectory("id", "libero_spatial", 0, "k", 1) is None
    row = store.episodes()[0]
    assert (row.arm_magnitude, row.near_zero, row.gripper_switches, row.stop_reason) == (
        pytest.approx(summary.arm_magnitude), pytest.approx(summary.near_zero), summary.gripper_switches,
        "out of steps")
    # a re-run that replaces the row without a trajectory leaves no stale one behind
    store.add(record(0, summary=summary))
    assert store.trajectory("id", "libero_spatial", 0, "k", 0) is None


def test_a_trajectory_is_written_with_its_row_or_not_at_all(tmp_path):
    store = ResultsStore(tmp_path / "r.sqlite")
    with pytest.raises(TypeError):
        store.add(record(0), trajectory=object())  # not bytes: the trajectory insert fails
    assert store.episodes() == []


def test_a_trace_without_kept_steps_has_no_blob_and_garbage_is_not_a_trajectory():
    assert run([START] * 3).to_blob() is None
    with pytest.raises(ValueError, match="not a stored trajectory"):
        EpisodeTrace.from_blob(b"not an npz")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, actions=np.zeros((2, 7), np.float32))
    with pytest.raises(ValueError, match="lacks eef_pos, eef_quat, gripper"):
        EpisodeTrace.from_blob(buffer.getvalue())


def _old_store(path):
    """A store as written before the action figures and trajectories (with the scene_check column)."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE episodes (checkpoint TEXT NOT NULL, identity TEXT NOT NULL, suite TEXT NOT NULL, "
               "task_index INTEGER NOT NULL, task_name TEXT NOT NULL, init_index INTEGER NOT NULL, seed INTEGER NOT "
               "NULL, protocol_key TEXT NOT NULL, protocol TEXT NOT NULL, success INTEGER NOT NULL, steps INTEGER "
               "NOT NULL, error TEXT, wall_s REAL NOT NULL, versions TEXT NOT NULL, render_backend TEXT NOT NULL, "
               "device TEXT NOT NULL, video TEXT, created REAL NOT NULL, scene_check TEXT, "
               "PRIMARY KEY (identity, suite, task_index, protocol_key, init_index))")
    db.execute("INSERT INTO episodes VALUES ('model', 'id', 'libero_spatial', 0, 't', 0, 1, 'k', '{}', 0, 220, NULL, "
               "1.0, '{}', 'egl', 'cpu', NULL, 0.0, 'match')")
    db.commit()
    db.close()


def test_an_old_store_opens_read_only_and_then_gains_the_new_columns(tmp_path):
    path = tmp_path / "old.sqlite"
    _old_store(path)
    read_only = ResultsStore(path, read_only=True)
    assert read_only.episodes()[0].stop_reason is None
    assert read_only.trajectory("id", "libero_spatial", 0, "k", 0) is None
    read_only.close()

    store = ResultsStore(path)
    old = store.episodes()[0]
    assert (old.arm_magnitude, old.near_zero, old.gripper_switches, old.stop_reason) == (None, None, None, None)
    trace = run([START] * 30, keep_steps=True)
    store.add(record(1, summary=trace.finish(False, 30, 30, None)), trajectory=trace.to_blob())
    assert [r.stop_reason for r in store.episodes()] == [None, "stalled"]
    assert store.trajectory("id", "libero_spatial", 0, "k", 1)["actions"].shape == (30, 7)


# ---- the summary ----------------------------------------------------------------------------------------------
def _render(table, width=400) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(table)
    return console.file.getvalue()


def _task_records():
    figures = [(0.5, 0.1, 2, True, None, "success"), (0.3, 0.5, 0, False, None, "stalled"),
               (0.1, 0.9, 0, False, None, "stalled"), (0.4, 0.2, 4, False, None, "out of steps"),
               (None, None, 0, False, "MuJoCo error", "error")]
    return [record(i, success, error, EpisodeSummary(a, z, g, reason))
            for i, (a, z, g, success, error, reason) in enumerate(figures)]


def test_task_figures_are_means_over_measured_episodes_and_failures_by_stop_reason():
    figures = task_figures(_task_records())
    assert figures.actions == ActionFigures(pytest.approx(0.325), pytest.approx(0.425), pytest.approx(1.5))
    assert figures.stop_reasons == {"stalled": 2, "out of steps": 1}
    assert figures.describe_stops() == "stalled 2, out of steps 1"
    assert task_figures([record(0)]).actions is None  # rows from before the figures existed


def test_the_summary_table_shows_the_figures_and_the_demonstrations_beside_them():
    results = results_from_records(_task_records())
    text = _render(task_table(results))
    for header in ("arm |a|", "near-zero", "gripper sw.", "failures by stop"):
        assert header in text
    row = next(line for line in text.splitlines() if "task1" in line)
    assert "0.325" in row and "42%" in row and "1.5" in row and "stalled 2, out of steps 1" in row
    demos = {("libero_spatial", 0): ActionFigures(0.61, 0.05, 2.0)}
    text = _render(task_table(results, demonstrations=demos))
    assert "arm |a| (demos)" in text
    row = next(line for line in text.splitlines() if "task1" in line)
    assert "0.325 (0.610)" in row and "42% (5%)" in row and "1.5 (2.0)" in row


def test_demonstration_figures_come_from_the_suites_dataset_matched_by_instruction(tmp_path, checkpoints_file):
    from vla_bench.envs.tasks import suite_tasks
    from vla_bench.registry import Registry

    task = suite_tasks("libero_spatial")[0]
    demos = [{"actions": EPISODE}, {"actions": EPISODE[:3]}]
    write_libero_demos(tmp_path / "demos" / f"{task.name}_demo.hdf5", demos, task.language)
    write_libero_demos(tmp_path / "demos" / "other_demo.hdf5", [{"actions": np.ones((5, 7))}], "another task")
    by_language, notes = figures_by_instruction(sorted((tmp_path / "demos").glob("*.hdf5")))
    assert notes == [] and set(by_language) == {task.language, "another task"}
    first, second = action_figures(EPISODE), action_figures(EPISODE[:3])
    assert by_language[task.language] == ActionFigures(
        *(pytest.approx((getattr(first, f) + getattr(second, f)) / 2) for f in ("arm_magnitude", "near_zero",
                                                                               "gripper_switches")))
    registry = Registry.load(checkpoints_file('default = "expert"\n[checkpoints.expert]\nkind = "scripted"\n'
                                              '[datasets.libero_spatial]\npath = "demos"\n'))
    results = results_from_records(_task_records())
    found, notes = task_demonstration_figures(registry, results)
    assert found == {("libero_spatial", 0): by_language[task.language]} and notes == []
    table, _ = closed_loop_summary(results, registry)
    assert "arm |a| (demos)" in _render(table)
    # no dataset for the suite: no demonstration figures, and no error
    registry = Registry.load(checkpoints_file('default = "expert"\n[checkpoints.expert]\nkind = "scripted"\n',
                                              name="plain.toml"))
    assert task_demonstration_figures(registry, results) == ({}, [])


# ---- against the simulator ------------------------------------------------------------------------------------
@pytest.mark.sim
def test_real_observations_a_still_arm_stalls_and_a_runaway_arm_leaves_the_workspace():
    """On LIBERO itself: the observations carry the pose the trace reads, an arm given no motion settles within
    STALL_DISTANCE (so it reads as stalled), and one driven sideways at full speed leaves the box."""
    from vla_bench.envs.libero import LiberoTaskEnv
    from vla_bench.protocol import reference_protocol

    protocol = reference_protocol("libero_spatial")
    env = LiberoTaskEnv(protocol, 0)
    try:
        for action, steps, reason in ((np.r_[np.zeros(6), -1.0], 30, "stalled"),
                                      (np.r_[0.0, 1.0, np.zeros(4), -1.0], 60, "left workspace")):
            o = env.reset(0, protocol.episode_seed(0, 0))
            trace = EpisodeTrace(keep_steps=True)
            for _ in range(steps):
                trace.add(action, o)
                o, _done = env.step(action)
            assert trace.finish(False, steps, steps, None).stop_reason == reason
            arrays = EpisodeTrace.from_blob(trace.to_blob())
            assert all(np.isfinite(a).all() for a in arrays.values())
            assert arrays["eef_pos"][0] == pytest.approx(START, abs=0.03)
    finally:
        env.close()
