"""Action chunks under the one execution rule (vla_bench/policies/repeat.py): the first replan_steps actions of
each chunk run in order, then the policy is asked again; a reset drops the rest of a slot's chunk; slots keep their
own phase; an action repeat is the special case of a chunk of k equal steps."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vla_bench.policies.repeat import ActionRepeater, step_actions


@settings(max_examples=60, deadline=None)
@given(horizon=st.integers(1, 6), replan=st.one_of(st.none(), st.integers(1, 8)),
       resets=st.lists(st.booleans(), min_size=1, max_size=30))
def test_each_chunk_runs_its_first_replan_steps_in_order_and_a_reset_drops_the_rest(horizon, replan, resets):
    """For any chunk length H, replan_steps r (None: all) and pattern of resets, the executed actions are, per
    request, the chunk's first min(r, H) actions in order, cut short only by a reset, after which the next step is a
    fresh request's first action."""
    repeater = ActionRepeater(1, replan)
    requests = []  # every chunk handed out, in order

    def query(rows):
        chunk = np.zeros((horizon, 7))
        chunk[:, 0] = len(requests)  # which request
        chunk[:, 1] = np.arange(horizon)  # which step of it
        requests.append(chunk)
        return [chunk]

    executed = []
    for reset in resets:
        if reset:
            repeater.reset(0)
        executed.append((reset, repeater.act([0], query)[0]))
    run = min(replan or horizon, horizon)
    expected_request, expected_step = -1, run  # nothing planned before the first step
    for reset, action in executed:
        if reset or expected_step == run:
            expected_request, expected_step = expected_request + 1, 0
        assert (action[0], action[1]) == (expected_request, expected_step)
        expected_step += 1
    assert repeater.queries == len(requests) == expected_request + 1


def test_slots_keep_their_own_chunk_phase():
    repeater = ActionRepeater(1, replan_steps=2)
    asked = []

    def query(rows):
        asked.append(list(rows))
        return np.stack([np.full((3, 7), 10 * len(asked) + r) for r in rows])

    repeater.act([0, 1], query)  # both asked
    repeater.reset(1)
    repeater.act([0, 1], query)  # slot 1 only: its chunk was dropped; slot 0 runs its second action
    out = repeater.act([0, 1], query)  # slot 0 asked again after 2 steps; slot 1 on its second
    assert asked == [[0, 1], [1], [0]]
    assert list(out[:, 0]) == [30, 21]


def test_an_action_repeat_is_a_chunk_of_k_rule_steps():
    prediction = np.array([[0.3, -0.6, 0.9, 0.0, 0.3, 0.6, 1.0]])
    by_repeat, by_chunk = ActionRepeater(3), ActionRepeater(1)
    chunk = np.repeat(step_actions(prediction, 3)[:, None], 3, axis=1)
    for _ in range(6):
        np.testing.assert_array_equal(by_repeat.act([0], lambda rows: prediction), by_chunk.act([0], lambda r: chunk))
    assert by_repeat.queries == by_chunk.queries == 2


def test_chunks_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match=r"chunk of shape \(2, 6\)"):
        ActionRepeater(1).act([0], lambda rows: [np.zeros((2, 6))])
    with pytest.raises(ValueError, match="cannot be combined"):
        ActionRepeater(2).act([0], lambda rows: [np.zeros((2, 7))])
