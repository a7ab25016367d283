"""Training data for fine-tuning: no-op filter, gripper convention, subsampling, readers, norm stats."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from vla_bench.data.libero_hdf5 import write_libero_demos
from vla_bench.data.rlds import write_rlds
from vla_bench.errors import VlaBenchError
from vla_bench.finetune.data import (NOOP_THRESHOLD, aggregate_steps, execution_rule, libero_gripper_to_training,
                                     load_training_data, noop_mask)
from vla_bench.finetune.stats import compute_norm_stats, dataset_statistics, write_dataset_statistics
from vla_bench.openvla.checkpoint import read_norm_stats
from vla_bench.gripper import OPEN_IS_MINUS_1, postprocess
from vla_bench.openvla.normalization import action_stats, normalize, unnormalize

OPEN, CLOSE = -1.0, 1.0  # LIBERO's raw gripper commands


def act(arm=0.0, gripper=OPEN) -> list[float]:
    return [arm] + [0.0] * 5 + [gripper]


# ---- no-op filter: the reference's cases -------------------------------------------------------------------------
@pytest.mark.parametrize("actions, keep", [
    # standing still with the gripper open: every step is a no-op, the first one too (norm test alone)
    ([act(), act(), act()], [False, False, False]),
    # standing still while the gripper closes: the step that changes the gripper is kept, the repeats are not
    ([act(0.5), act(0.0, CLOSE), act(0.0, CLOSE), act(0.0, OPEN)], [True, True, False, True]),
    # the comparison is with the previous *kept* action: before any step is kept only the norm counts, so a
    # gripper change between two dropped steps does not save the second one
    ([act(0.0, CLOSE), act(0.0, OPEN), act(0.3, OPEN)], [False, False, True]),
    # the threshold is strict: a norm of exactly 1e-4 moves, just under it does not
    ([act(0.2), act(NOOP_THRESHOLD), act(0.99 * NOOP_THRESHOLD)], [True, True, False]),
    # a tiny motion that is not a no-op because the gripper changed
    ([act(0.2), act(1e-6, CLOSE)], [True, True]),
])
def test_noop_cases(actions, keep):
    assert noop_mask(np.array(actions)).tolist() == keep


def test_noop_norm_covers_all_six_arm_dims():
    rotation_only = np.array([act(0.3), [0, 0, 0, 0, 0, 2e-4, OPEN], [0, 0, 0, 0, 0, 5e-5, OPEN]])
    assert noop_mask(rotation_only).tolist() == [True, True, False]


episodes = st.integers(1, 30).flatmap(lambda n: st.tuples(
    arrays(np.float64, (n, 6), elements=st.sampled_from([0.0, 0.0, 1e-5, 3e-5, 0.01, -0.2, 1.0])),
    arrays(np.float64, (n, 1), elements=st.sampled_from([OPEN, CLOSE])),
)).map(lambda t: np.concatenate(t, axis=1))


@given(episodes)
def test_filtering_twice_equals_filtering_once(actions):
    """Filtering an already filtered episode keeps every step: OpenVLA's no_noops datasets can go through the
    filter again unchanged."""
    kept = actions[noop_mask(actions)]
    assert noop_mask(kept).all()


@given(episodes)
def test_every_dropped_step_is_small_and_repeats_the_last_kept_gripper(actions):
    """A step is dropped only if its arm command is below the threshold and (once something was kept) its gripper
    equals the last kept gripper; every step that moves the arm is kept."""
    keep = noop_mask(actions)
    moving = np.linalg.norm(actions[:, :6], axis=1) >= NOOP_THRESHOLD
    assert keep[moving].all()
    last = None
    for a, k in zip(actions, keep):
        if not k:
            assert last is None or a[6] == last
        else:
            last = a[6]


# ---- gripper convention ------------------------------------------------------------------------------------------
def test_training_gripper_is_openvlas_and_evaluation_inverts_it():
    g = libero_gripper_to_training([OPEN, CLOSE])
    assert g.tolist() == [1.0, 0.0]  # OpenVLA's datasets: 1 = open, 0 = closed
    # the model predicts these un-normalized; decoding gives bin centres (0.996 for 1.0): eval maps them back
    for predicted, command in ((g[0], OPEN), (g[1], CLOSE), (0.99608, OPEN), (0.0, CLOSE)):
        out = postprocess(np.array([[0, 0, 0, 0, 0, 0, predicted]]), OPEN_IS_MINUS_1)
        assert out[0, 6] == command


# ---- subsampling -------------------------------------------------------------------------------------------------
def test_aggregation_sums_arm_deltas_and_keeps_the_last_gripper():
    a = np.array([[1, 0, 0, 0, 0, 0.1, OPEN], [2, 0, 0, 0, 0, 0.1, OPEN], [3, 1, 0, 0, 0, 0.1, CLOSE],
                  [4, 0, 0, 0, 0, 0.0, CLOSE], [5, 0, 0, 0, 0, 0.0, OPEN]], dtype=float)
    agg, starts = aggregate_steps(a, 2)
    assert starts.tolist() == [0, 2, 4]
    np.testing.assert_allclose(agg, [[3, 0, 0, 0, 0, 0.2, OPEN], [7, 1, 0, 0, 0, 0.1, CLOSE],
                                     [5, 0, 0, 0, 0, 0.0, OPEN]])
    rule = execution_rule(2)
    assert rule["action_repeat"] == 2 and rule["arm_scale"] == 0.5 and rule["policy_hz"] == 10.0


@given(episodes, st.integers(1, 7))
def test_replaying_aggregated_actions_by_the_rule_moves_the_arm_as_far(actions, k):
    """Executing each aggregated action by its rule (arm scaled by 1/k, repeated k times) commands the same total
    arm motion as the original steps, and each window's gripper is its last step's."""
    agg, starts = aggregate_steps(actions, k)
    rule = execution_rule(k)
    replayed = (agg[:, :6] * rule["arm_scale"] * rule["action_repeat"]).sum(0)
    np.testing.assert_allclose(replayed, actions[:, :6].sum(0), atol=1e-9)
    ends = np.minimum(starts + k, len(actions)) - 1
    np.testing.assert_array_equal(agg[:, 6], actions[ends, 6])


# ---- norm stats --------------------------------------------------------------------------------------------------
def test_norm_stats_match_numpy_and_load_through_the_checkpoint_reader(tmp_path):
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.normal(scale=0.3, size=(500, 6)), rng.integers(0, 2, (500, 1))], axis=1)
    a32 = a.astype(np.float32)
    stats = compute_norm_stats(a, num_trajectories=7)
    s = stats["action"]
    np.testing.assert_allclose(s["mean"], a32.mean(0), rtol=1e-6)
    np.testing.assert_allclose(s["std"], a32.std(0), rtol=1e-6)
    np.testing.assert_allclose(s["min"], a32.min(0))
    np.testing.assert_allclose(s["max"], a32.max(0))
    np.testing.assert_allclose(s["q01"], np.quantile(a32, 0.01, axis=0), rtol=1e-6)
    np.testing.assert_allclose(s["q99"], np.quantile(a32, 0.99, axis=0), rtol=1e-6)
    assert s["mask"] == [True] * 6 + [False]
    assert stats["num_transitions"] == 500 and stats["num_trajectories"] == 7
    assert stats["proprio"]["q99"] == [0.0] * 7  # OpenVLA trains without proprio: its stats are over zeros

    path = write_dataset_statistics(tmp_path, {"libero_spatial_no_noops": stats})
    loaded = read_norm_stats(tmp_path, {})
    assert json.loads(path.read_text()) == loaded
    q = action_stats(loaded, "libero_spatial_no_noops")
    np.testing.assert_allclose(q["q01"], s["q01"])
    assert q["mask"].tolist() == s["mask"]


def test_scaling_actions_by_a_constant_changes_nothing_after_q01_q99_normalization():
    """Why people reach for it: the robot moves too little after fine-tuning (at 20 Hz the per-step deltas are
    tiny), so "multiply the training actions by 10, divide at eval" sounds like it gives the model bigger, easier
    targets. It does nothing: BOUNDS_Q99 maps every dimension through (x - q01) / (q99 - q01), and scaling the data
    by c scales x, q01 and q99 alike, so the normalized targets, hence the tokens the model learns, are identical;
    at evaluation the unnormalized output is c times larger and the division takes it back. The real cure for
    near-zero actions is the no-op filter (or coarser time steps, with the execution rule written down)."""
    rng = np.random.default_rng(1)
    a = np.concatenate([rng.normal(scale=0.05, size=(400, 6)), rng.integers(0, 2, (400, 1))], axis=1)
    for c in (10.0, 0.1, 3.7):
        scaled = a.copy()
        scaled[:, :6] *= c
        s1, s2 = compute_norm_stats(a, 1)["action"], compute_norm_stats(scaled, 1)["action"]
        n1 = normalize(a, np.array(s1["q01"]), np.array(s1["q99"]), np.array(s1["mask"]))
        n2 = normalize(scaled, np.array(s2["q01"]), np.array(s2["q99"]), np.array(s2["mask"]))
        np.testing.assert_allclose(n1, n2, atol=1e-5)
        # and the round trip through the scaled stats, divided by c, is the original action
        back = unnormalize(n2, np.array(s2["q01"]), np.array(s2["q99"]), np.array(s2["mask"]))
        back[:, :6] /= c
        inside = (n1[:, :6] > -1) & (n1[:, :6] < 1)  # values outside [q01, q99] are clipped by design
        np.testing.assert_allclose(back[:, :6][inside], a[:, :6][inside], atol=1e-5)


@given(st.floats(0.01, 100.0))
@settings(max_examples=25)
def test_normalized_targets_do_not_depend_on_the_action_scale(c):
    """For every positive constant c, normalizing c * actions with their own stats gives the same targets."""
    a = np.random.default_rng(2).normal(scale=0.1, size=(200, 7))
    a[:, 6] = a[:, 6] > 0
    b = a.copy()
    b[:, :6] *= c
    sa, sb = compute_norm_stats(a, 1)["action"], compute_norm_stats(b, 1)["action"]
    na = normalize(a, np.array(sa["q01"]), np.array(sa["q99"]), np.array(sa["mask"]))
    nb = normalize(b, np.array(sb["q01"]), np.array(sb["q99"]), np.array(sb["mask"]))
    np.testing.assert_allclose(na, nb, atol=1e-4)


# ---- readers: LIBERO HDF5 and RLDS give the same examples -----------------------------------------------------------
def _demo(rng, steps=12, size=8):
    actions = np.clip(rng.normal(scale=0.3, size=(steps, 7)), -1, 1)
    actions[:, 6] = np.where(np.arange(steps) < steps // 2, OPEN, CLOSE)
    actions[1, :6] = 0.0  # a no-op (same gripper as step 0)
    actions[steps // 2, :6] = 0.0  # standing still while closing: kept
    frames = rng.integers(0, 255, (steps, size, size, 3), dtype=np.uint8)
    return actions, frames


def test_libero_hdf5_and_rlds_sources_give_the_same_training_examples(tmp_path):
    rng = np.random.default_rng(3)
    demos = [_demo(rng) for _ in range(3)]
    write_libero_demos(tmp_path / "hdf5" / "put_the_bowl_on_the_plate_demo.hdf5",
                       [{"actions": a, "obs": {"agentview_rgb": f}} for a, f in demos], "put the bowl on the plate")
    # OpenVLA's RLDS conversion stores the frames rotated 180 degrees and the raw LIBERO actions
    episodes = [{"steps": {"observation": {"image": np.ascontiguousarray(f[:, ::-1, ::-1])},
                           "action": a.astype(np.float32),
                           "language_instruction": np.array(["put the bowl on the plate"] * len(a), dtype=object)}}
                for a, f in demos]
    root = write_rlds(tmp_path / "rlds", {"train": episodes}, name="libero_spatial_no_noops", image_format="png")

    from_hdf5 = load_training_data("libero_hdf5", tmp_path / "hdf5")
    from_rlds = load_training_data("libero_rlds", root)
    assert len(from_hdf5) == len(from_rlds) == 3 * 11  # one no-op per demo dropped
    assert from_hdf5.info["noop_filter"]["dropped"] == 3
    for i in range(len(from_hdf5)):
        x, y = from_hdf5[i], from_rlds[i]
        np.testing.assert_allclose(x["action"], y["action"], atol=1e-6)
        np.testing.assert_array_equal(x["image"], y["image"])
        assert x["instruction"] == y["instruction"] == "put the bowl on the plate"
    # the first example is step 0 of demo 0: the frame is upright (rotated), the gripper in OpenVLA's convention
    a0, f0 = demos[0]
    first = from_hdf5[0]
    np.testing.assert_array_equal(first["image"], f0[0, ::-1, ::-1])
    assert first["action"][6] == 1.0 and np.allclose(first["action"][:6], a0[0, :6])
    assert set(np.unique(from_hdf5.actions()[:, 6])) == {0.0, 1.0}

    stats = dataset_statistics(from_hdf5, "libero_spatial_no_noops")["libero_spatial_no_noops"]
    assert stats["num_transitions"] == 33 and stats["num_trajectories"] == 3


def test_subsampled_source_records_its_execution_rule(tmp_path):
    rng = np.random.default_rng(4)
    a, f = _demo(rng, steps=10)
    write_libero_demos(tmp_path / "t_demo.hdf5", [{"actions": a, "obs": {"agentview_rgb": f}}], "do it")
    data = load_training_data("libero_hdf5", tmp_path / "t_demo.hdf5", action_repeat=3)
    kept = a[noop_mask(a)]  # 9 steps -> windows of 3
    assert len(data) == 3 and data.info["execution"]["action_repeat"] == 3
    np.testing.assert_allclose(data.actions()[:, :6], kept[:, :6].reshape(3, 3, 6).sum(1), atol=1e-6)
    # each example shows the frame at its window's first kept step
    first_kept = np.nonzero(noop_mask(a))[0][[0, 3, 6]]
    for i, t in enumerate(first_kept):
        np.testing.assert_array_equal(data[i]["image"], f[t, ::-1, ::-1])


def test_held_out_split_is_by_whole_trajectories(tmp_path):
    rng = np.random.default_rng(5)
    write_libero_demos(tmp_path / "t_demo.hdf5",
                       [{"actions": _demo(rng)[0]} for _ in range(10)], "do it")
    data = load_training_data("libero_hdf5", tmp_path / "t_demo.hdf5", images=False)
    train, held = data.split(0.2, seed=0)
    assert len(held.trajectories) == 2 and len(train.trajectories) == 8
    assert not {t.episode_id for t in train.trajectories} & {t.episode_id for t in held.trajectories}
    assert len(train) + len(held) == len(data)
    assert [t.episode_id for t in data.split(0.2, seed=0)[1].trajectories] == \
        [t.episode_id for t in held.trajectories]


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(VlaBenchError, match="valid: libero_hdf5"):
        load_training_data("lerobot", tmp_path)
    with pytest.raises(VlaBenchError, match="no \\*.hdf5"):
        load_training_data("libero_hdf5", tmp_path)
    with pytest.raises(VlaBenchError, match="action_repeat"):
        aggregate_steps(np.zeros((3, 7)), 0)
