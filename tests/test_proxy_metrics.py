"""Proxy metrics against hand-computed cases and stated properties, and the open-loop engine with its controls."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import stats

from vla_bench.data.libero_hdf5 import write_libero_demos
from vla_bench.errors import VlaBenchError
from vla_bench.metrics import action_metrics as m
from vla_bench.policies.controls import NoopPolicy, RandomPolicy
from vla_bench.policies.replay import ReplayPolicy
from vla_bench.open_loop import (DEFAULT_THRESHOLDS, GATED_METRICS, bridge_action_space, bridge_source,
                             evaluate_open_loop, libero_source, predict_episodes, resolve_thresholds)

from tests.conftest import BRIDGE_DEBUG

# ------------------------------------------------------------------------------------------ hand-computed cases


def test_l1_mse_hand():
    pred = np.array([[1.0, 0.0], [3.0, -2.0]])
    gt = np.array([[0.0, 0.0], [1.0, 2.0]])
    np.testing.assert_allclose(m.l1_per_dim(pred, gt), [1.5, 2.0])
    np.testing.assert_allclose(m.mse_per_dim(pred, gt), [2.5, 8.0])


def test_normalize_bounds_q99_hand():
    x = np.array([[0.0, 5.0, 0.7], [2.0, -5.0, 0.2]])
    out = m.normalize_bounds_q99(x, [0.0, -1.0, 0.0], [2.0, 1.0, 1.0], mask=[True, True, False])
    np.testing.assert_allclose(out, [[-1.0, 1.0, 0.7], [1.0, -1.0, 0.2]], atol=1e-7)


def test_dead_zone_for_bridge_covers_the_no_motion_bin():
    space = bridge_action_space()
    mid = np.abs((space.q01 + space.q99) / 2)[:6]
    assert np.all(space.dead_zone[:6] >= mid)
    assert space.dead_zone[2] == pytest.approx(7.03e-3, rel=1e-2)  # z: the offset dominates
    assert space.dead_zone[4] == pytest.approx(7.48e-3, rel=1e-2)  # pitch
    no_motion = (space.q01 + space.q99)[:6] / 2  # what bin 127 decodes to
    assert np.all(m.direction(no_motion[None], space.dead_zone[:6]) == 0)


def test_sign_accuracy_hand():
    gt = np.array([[1.0, -1.0], [0.05, 1.0], [-2.0, 0.5]])
    pred = np.array([[0.5, 1.0], [9.0, 0.05], [-1.0, 2.0]])
    zone = np.array([0.1, 0.1])
    # counted: dim0 rows 0, 2 (row 1 inside the zone); dim1 rows 0, 1, 2
    # correct: dim0 rows 0, 2; dim1 row 2 (row 0 wrong sign, row 1 prediction inside the zone)
    correct, counted = m.sign_agreement(pred, gt, zone)
    assert correct.tolist() == [2, 1] and counted.tolist() == [2, 3]
    assert m.sign_accuracy(pred, gt, zone) == pytest.approx(3 / 5)
    np.testing.assert_allclose(m.sign_accuracy_per_dim(pred, gt, zone), [1.0, 1 / 3])
    assert np.isnan(m.sign_accuracy(pred, np.zeros_like(gt), zone))


def test_pearson_matches_scipy_and_guards_constants():
    rng = np.random.default_rng(0)
    gt = rng.normal(size=(50, 3))
    pred = gt * [1.0, -2.0, 0.0] + rng.normal(scale=0.5, size=(50, 3)) * [1, 1, 0] + [0, 0, 0.3]
    r = m.pearson_per_dim(pred, gt)
    for d in range(2):
        assert r[d] == pytest.approx(stats.pearsonr(pred[:, d], gt[:, d])[0], abs=1e-12)
    assert np.isnan(r[2])  # constant prediction: undefined
    assert m.mean_correlation(r) == pytest.approx((r[0] + r[1]) / 3)
    # moments of parts, centred on common values, add up to the moments of the whole
    c = (pred.mean(0), gt.mean(0))
    parts = m.correlation_moments(pred[:20], gt[:20], *c) + m.correlation_moments(pred[20:], gt[20:], *c)
    np.testing.assert_allclose(m.pearson_from_moments(parts), r, equal_nan=True)


def test_gripper_accuracy_each_side_in_its_convention():
    bridge_pred = np.array([0.996, 0.0, 0.6, 0.4])  # 1 = open
    libero_gt = np.array([-1.0, 1.0, 1.0, 1.0])  # -1 = open
    # pred open/closed: open, closed, open, closed; gt: open, closed, closed, closed -> 3 of 4 agree
    assert m.gripper_accuracy(bridge_pred, libero_gt, "open_is_1", "open_is_minus_1") == pytest.approx(0.75)
    assert m.gripper_accuracy(bridge_pred, bridge_pred, "open_is_1", "open_is_1") == 1.0
    with pytest.raises(VlaBenchError, match="unknown gripper convention 'open'; choices: open_is_1, open_is_minus_1"):
        m.gripper_open([1.0], "open")


def test_diversity_near_zero_and_magnitude_hand():
    pred = np.array([[0.0, 1.0], [0.0, 1.0], [0.5, 1.0], [0.0, 1.0]])
    assert m.output_diversity(pred) == 0.5 and m.distinct_rows(pred) == 2
    assert m.near_zero_fraction(np.array([[0.0, 0.2], [0.05, -0.3]]), [0.1, 0.1]) == 0.5
    np.testing.assert_allclose(m.mean_magnitude_ratio([[1.0, 0.0], [-1.0, 0.0]], [[2.0, 0.0], [2.0, 0.0]]),
                               [0.5, np.nan])


def test_success_score_hand():
    zone = np.full(7, 0.1)
    gt = np.array([[1.0, 0.0, 0.0, 0, 0, 0, 1.0],  # moving +x, open
                   [0.0, 0.0, 0.0, 0, 0, 0, 0.0],  # still, closed
                   [0.0, 1.0, 1.0, 0, 0, 0, 1.0],  # moving +y+z, open
                   [0.0, 0.0, -1.0, 0, 0, 0, 0.0]])  # moving -z, closed
    pred = np.array([[0.5, 0.3, 0.0, 9, 9, 9, 0.9],  # dot > 0, open: right
                     [0.05, 0.0, 0.0, 0, 0, 0, 0.1],  # still (inside the zone), closed: right
                     [0.0, -1.0, 3.0, 0, 0, 0, 0.2],  # dot 2 > 0 but closed: wrong
                     [0.0, 0.0, 0.0, 0, 0, 0, 0.0]])  # no motion where gt moves: wrong
    assert m.step_correct(pred, gt, zone, "open_is_1", "open_is_1").tolist() == [True, True, False, False]
    assert m.episode_success_score(pred, gt, zone, "open_is_1", "open_is_1") == 0.5
    assert m.success_proxy([0.5, 0.49, 1.0], 0.5).tolist() == [True, False, True]


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = np.random.default_rng(3).uniform(size=40)
    ones = np.ones(40)
    a = m.bootstrap_ratio_interval(values, ones, seed=7)
    assert a == m.bootstrap_ratio_interval(values, ones, seed=7)
    assert a != m.bootstrap_ratio_interval(values, ones, seed=8)
    assert a[0] < values.mean() < a[1]
    # about mean +- 1.96 standard errors for a mean of 40 values
    se = values.std(ddof=1) / np.sqrt(40)
    assert a[1] - a[0] == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert m.bootstrap_ratio_interval([], []) != m.bootstrap_ratio_interval([], [])  # (nan, nan)
    assert m.bootstrap_ratio_interval(np.full(5, 2.0), np.full(5, 4.0)) == (0.5, 0.5)


# ------------------------------------------------------------------------------------------------ properties

finite = st.floats(-1e3, 1e3, allow_nan=False).map(lambda v: 0.0 if abs(v) < 1e-6 else v)
pairs = st.integers(1, 12).flatmap(lambda n: st.tuples(arrays(np.float64, (n, 3), elements=finite),
                                                       arrays(np.float64, (n, 3), elements=finite)))


@given(pairs, st.floats(1e-3, 1e3))
@settings(max_examples=200, deadline=None)
def test_sign_accuracy_is_invariant_to_positive_scaling(pair, c):
    """Sign accuracy is invariant to positive scaling of the prediction (with no dead zone, only signs count)."""
    pred, gt = pair
    zone = np.zeros(3)
    a, b = m.sign_accuracy(pred, gt, zone), m.sign_accuracy(c * pred, gt, zone)
    assert (np.isnan(a) and np.isnan(b)) or a == b


@given(pairs, st.integers(-10, 10), arrays(np.float64, 3, elements=st.floats(0, 10)))
@settings(max_examples=200, deadline=None)
def test_sign_accuracy_is_invariant_to_scaling_everything(pair, exponent, zone):
    """Scaling prediction, ground truth and dead zone by the same positive factor leaves sign accuracy unchanged
    (a change of units); the factor is a power of two so the scaling itself is exact."""
    pred, gt = pair
    c = 2.0 ** exponent
    a, b = m.sign_accuracy(pred, gt, zone), m.sign_accuracy(c * pred, c * gt, c * zone)
    assert (np.isnan(a) and np.isnan(b)) or a == b


@given(pairs)
@settings(max_examples=200, deadline=None)
def test_correlation_lies_in_minus_one_one(pair):
    """Every per-dim correlation lies in [-1, 1], and it is undefined (NaN) exactly where a side is constant."""
    pred, gt = pair
    r = m.pearson_per_dim(pred, gt)
    defined = r[~np.isnan(r)]
    assert np.all((defined >= -1) & (defined <= 1))
    constant = (np.ptp(pred, axis=0) == 0) | (np.ptp(gt, axis=0) == 0)
    assert np.array_equal(np.isnan(r), constant)


@given(pairs, st.data())
@settings(max_examples=200, deadline=None)
def test_l1_is_zero_iff_inputs_equal(pair, data):
    """L1 error is 0 in every dim exactly when prediction and ground truth are equal."""
    pred, gt = pair
    if data.draw(st.booleans()):
        gt = pred.copy()
    assert np.all(m.l1_per_dim(pred, gt) == 0) == np.array_equal(pred, gt)


@given(arrays(np.float64, st.tuples(st.integers(1, 30), st.integers(1, 7)),
              elements=st.sampled_from([0.0, -1.0, 0.5, 1.0])))
@settings(max_examples=200, deadline=None)
def test_diversity_in_zero_one(pred):
    """Output diversity of a non-empty prediction lies in (0, 1], and is 1 exactly when no row repeats."""
    d = m.output_diversity(pred)
    assert 0 < d <= 1
    assert (d == 1) == (len({tuple(r) for r in pred}) == len(pred))


# ------------------------------------------------------------------------------------------------ engine


def test_thresholds_live_in_one_place_and_can_be_overridden():
    assert set(GATED_METRICS) == {"sign_accuracy", "correlation", "gripper_accuracy", "diversity",
                                  "success_proxy_rate"}
    t = DEFAULT_THRESHOLDS
    assert not t["sign_accuracy"].passes(0.55) and t["sign_accuracy"].passes(0.5501)
    assert t["success_proxy_rate"].passes(0.5) and t["success_proxy_rate"].warning(0.9)
    assert t["success_proxy_rate"].warning(0.7) is None
    assert not t["correlation"].passes(float("nan"))
    custom = resolve_thresholds({"correlation": 0.3, "diversity": {"minimum": 0.5, "inclusive": True}})
    assert custom["correlation"].minimum == 0.3 and custom["diversity"].passes(0.5)
    with pytest.raises(VlaBenchError, match="unknown proxy metric 'corr' in thresholds; choices: sign_accuracy, correlation"):
        resolve_thresholds({"corr": 0.2})


class EchoStepPolicy:
    """Records what it is shown; answers with the step index so batching mistakes are visible."""

    needs_images = True
    needs_privileged = False

    def __init__(self):
        self.resets, self.seen = [], []

    def reset(self, slot, seed):
        self.resets.append((slot, seed))

    def act(self, observations, instructions, slots):
        self.seen.extend((o["episode_id"], o["step"]) for o in observations)
        assert all("ground_truth_action" not in o and o["image"].shape == (4, 4, 3) for o in observations)
        return np.array([[o["step"]] * 7 for o in observations], dtype=float)


def _toy_episodes(lengths):
    rng = np.random.default_rng(0)
    return [{"episode_id": f"e{i}", "instruction": "go", "action": rng.normal(size=(n, 7)),
             "state": np.zeros((n, 7)), "image": np.zeros((n, 4, 4, 3), np.uint8)} for i, n in enumerate(lengths)]


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_predictions_do_not_depend_on_batch_size(batch_size):
    policy = EchoStepPolicy()
    out = predict_episodes(policy, _toy_episodes([3, 1, 0, 4]), batch_size=batch_size, seed=10)
    assert [p.episode_id for p in out] == ["e0", "e1", "e3"]  # the empty episode is skipped
    for p in out:
        assert p.predicted[:, 0].tolist() == list(range(len(p.ground_truth)))
    assert sorted(seed for _slot, seed in policy.resets) == [10, 11, 13]
    for episode in ("e0", "e3"):  # each episode is shown in time order
        steps = [s for e, s in policy.seen if e == episode]
        assert steps == sorted(steps)


def test_wrong_action_shape_names_the_policy():
    class Bad(EchoStepPolicy):
        def act(self, observations, instructions, slots):
            return np.zeros((len(slots), 6))
    with pytest.raises(VlaBenchError, match=r"Bad.act returned shape \(2, 6\) for 2 slots; expected \(2, 7\)"):
        predict_episodes(Bad(), _toy_episodes([2, 2]), batch_size=2)


@pytest.fixture(scope="module")
def bridge_results():
    source = bridge_source(BRIDGE_DEBUG, "train")
    return {name: evaluate_open_loop(policy, source, batch_size=4)
            for name, policy in (("replay", ReplayPolicy()), ("noop", NoopPolicy()), ("random", RandomPolicy()))}


def test_replay_passes_every_check_on_the_real_shard(bridge_results):
    result = bridge_results["replay"]
    assert len(result.predictions) == 25 and sum(len(p.predicted) for p in result.predictions) == 200
    for name in GATED_METRICS:
        figure = result.figures[name]
        assert figure.passed, (name, figure.value)
        assert figure.n_episodes == 25 and figure.interval[0] <= figure.value <= figure.interval[1]
    assert result.figures["l1_physical"].value == 0 and result.figures["magnitude_ratio"].value == 1


def test_noop_fails_every_check_on_the_real_shard(bridge_results):
    result = bridge_results["noop"]
    for name in GATED_METRICS:
        assert result.figures[name].passed is False, (name, result.figures[name].value)
    # the collapse signature: every prediction near zero, against far fewer in the data
    near = result.figures["near_zero_fraction"]
    assert near.value == 1.0 and near.reference < 0.5
    assert result.figures["diversity"].value == pytest.approx(1 / 8)


def test_random_control_sits_at_chance_on_the_real_shard(bridge_results):
    figures = bridge_results["random"].figures
    for name in ("sign_accuracy", "correlation", "gripper_accuracy", "success_proxy_rate"):
        assert figures[name].passed is False, (name, figures[name].value)
    assert 0.4 < figures["sign_accuracy"].value < 0.6 and abs(figures["correlation"].value) < 0.1


def test_open_loop_on_libero_demos(tmp_path):
    rng = np.random.default_rng(5)
    demos = []
    for _ in range(6):
        steps = 30
        move = np.cumsum(rng.normal(scale=0.2, size=(steps, 6)), axis=0).clip(-1, 1)
        gripper = np.where(np.arange(steps) < 15, -1.0, 1.0)[:, None]
        demos.append({"actions": np.concatenate([move, gripper], axis=1),
                      "obs": {"agentview_rgb": rng.integers(0, 255, (steps, 8, 8, 3), dtype=np.uint8),
                              "ee_states": rng.normal(size=(steps, 6)), "gripper_states": rng.normal(size=(steps, 2))}})
    path = write_libero_demos(tmp_path / "demo.hdf5", demos, "put the bowl on the plate")
    replay = evaluate_open_loop(ReplayPolicy(), libero_source(path))
    assert replay.action_space.gt_gripper == "open_is_minus_1"
    assert all(replay.figures[name].passed for name in GATED_METRICS)
    noop = evaluate_open_loop(NoopPolicy(), libero_source(path))
    for name in ("sign_accuracy", "correlation", "diversity", "success_proxy_rate"):
        assert noop.figures[name].passed is False
    # LIBERO's noop holds the gripper open (-1), right on exactly the open half of the frames
    assert noop.figures["gripper_accuracy"].value == pytest.approx(0.5)
