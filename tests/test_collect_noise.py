"""The action perturbation of `vla-bench collect --action-noise` (no simulator)."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vla_bench.collect.episode import ARM_DIMS, perturb


@settings(max_examples=50, deadline=None)
@given(action=st.lists(st.floats(-1, 1), min_size=7, max_size=7), sigma=st.floats(0.01, 1.0),
       seed=st.integers(0, 2**32 - 1))
def test_perturb_moves_only_the_arm_and_stays_in_range(action, sigma, seed):
    """For any action in range, any sigma and seed: the perturbed action stays in [-1, 1], keeps the gripper
    command, leaves the input untouched, and is the same for the same generator seed."""
    action = np.array(action)
    before = action.copy()
    out = perturb(action, sigma, np.random.default_rng(seed))
    assert np.all(np.abs(out) <= 1.0)
    assert out[ARM_DIMS] == action[ARM_DIMS]
    np.testing.assert_array_equal(action, before)
    np.testing.assert_array_equal(out, perturb(action, sigma, np.random.default_rng(seed)))


def test_perturb_noise_has_the_requested_scale():
    rng = np.random.default_rng(0)
    zero = np.zeros(7)
    noise = np.stack([perturb(zero, 0.1, rng)[:ARM_DIMS] for _ in range(2000)])
    assert abs(noise.std() - 0.1) < 0.005 and abs(noise.mean()) < 0.005
