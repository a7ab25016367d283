"""The closed-loop episode runners' checks of a policy's actions, on a stand-in environment (no simulator): a
non-finite, misshapen or far-out-of-range action ends that episode as an error naming the step, in the batched
runner and inside env workers alike, and other episodes carry on."""
import numpy as np
import pytest

from tests.test_bad_input import SEEN
from vla_bench.engine.pool import Answer
from vla_bench.protocol import reference_protocol
from tests.fake_pool import rollout_episodes
from vla_bench.engine.episode import EpisodeRequest, action_error, run_in_worker

PROTOCOL = reference_protocol("libero_spatial", episodes=3, max_steps=5)
NAN_CASE = "a policy returning NaN or Inf in closed loop (an error, counted apart)"
FAR_CASE = "a policy returning actions beyond 2 (LIBERO's range is [-1, 1])"
SHAPE_CASE = "a policy returning actions of the wrong shape in closed loop"


class StandInEnv:
    """VectorLiberoEnv's interface over `n` slots whose episodes never succeed; records what it executed."""

    def __init__(self, n: int):
        self.n, self.executed = n, []

    def reset(self, requests):
        return {slot: Answer({"slot": slot}) for slot in requests}

    def step(self, actions):
        self.executed.extend(np.asarray(a).copy() for a in actions.values())
        return {slot: Answer({"slot": slot}) for slot in actions}


class Scripted:
    """Returns `bad(action row)` for episode `bad_init` from its step `at_step` on; a still arm otherwise."""

    needs_images = needs_privileged = False

    def __init__(self, bad, at_step=3, bad_slot=0):
        self.bad, self.at_step, self.bad_slot, self.steps = bad, at_step, bad_slot, {}

    def reset(self, slot, seed):
        self.steps[slot] = 0

    def act(self, observations, instructions, slots):
        actions = np.zeros((len(slots), 7))
        for k, slot in enumerate(slots):
            self.steps[slot] += 1
            if slot == self.bad_slot and self.steps[slot] >= self.at_step:
                bad = self.bad(actions[k])
                if bad is None:
                    return actions[:, :6]  # the wrong shape for the whole batch
                actions[k] = bad
        return actions


def _with(index, value):
    def change(row):
        row = row.copy()
        row[index] = value
        return row
    return change


@pytest.mark.parametrize("bad, case", [(_with(0, np.nan), NAN_CASE), (_with(3, np.inf), NAN_CASE),
                                       (_with(1, -40.0), FAR_CASE)])
def test_one_bad_action_ends_only_its_episode_as_an_error(bad, case):
    env, outcomes = StandInEnv(2), []
    rollout_episodes(Scripted(bad), env, PROTOCOL, 0, "do it", [0, 1, 2], outcomes.append)
    by_init = {o.init_index: o for o in outcomes}
    assert sorted(by_init) == [0, 1, 2]
    assert SEEN[case] in by_init[0].error and "at step 3" in by_init[0].error and by_init[0].steps == 2
    assert by_init[1].error is None and by_init[1].steps == PROTOCOL.max_steps  # an ordinary failure
    assert all(np.isfinite(a).all() and np.abs(a).max() <= 1 for a in env.executed)  # nothing bad reached the env


def test_a_batch_of_the_wrong_shape_ends_every_running_episode_as_an_error():
    env, outcomes = StandInEnv(2), []
    rollout_episodes(Scripted(lambda row: None), env, PROTOCOL, 0, "do it", [0, 1], outcomes.append)
    assert len(outcomes) == 2
    assert all(SEEN[SHAPE_CASE] in o.error and "at step 3" in o.error and "(2, 6)" in o.error for o in outcomes)


def test_actions_slightly_beyond_the_range_are_executed_clipped_by_the_env_not_refused():
    assert action_error(np.array([1.5, -1.2, 0, 0, 0, 0, 1.0]), 1) is None


class WorkerEnv:
    """LiberoTaskEnv's interface for run_in_worker (the episode loop of in-worker policies)."""

    protocol = PROTOCOL
    scene_check = "unchecked: a stand-in"
    renderer = "none"

    def reset(self, init_index, seed):
        return {}

    def step(self, action):
        return {}, False


@pytest.mark.parametrize("bad, case", [(_with(2, np.nan), NAN_CASE), (_with(0, 9.0), FAR_CASE),
                                       (lambda row: None, SHAPE_CASE)])
def test_in_worker_episodes_end_as_an_error_naming_the_step(bad, case):
    result = run_in_worker(WorkerEnv(), Scripted(bad, at_step=4), EpisodeRequest(0, 1, "do it", 5))
    assert not result.success and SEEN[case] in result.error and "at step 4" in result.error and result.steps == 3


class OnDevice:
    def __init__(self, device):
        self.device = device


def test_rows_record_the_gpu_by_index_and_name(monkeypatch):
    import torch

    from vla_bench.evaluate import device_description

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"NVIDIA H200 #{index}")
    assert device_description(OnDevice(torch.device("cuda"))) == "cuda:0 NVIDIA H200 #0"
    assert device_description(OnDevice("cuda:1")) == "cuda:1 NVIDIA H200 #1"
    assert device_description(OnDevice(torch.device("cpu"))) == "cpu"
    assert device_description(object()) == "cpu"  # NumPy policies: the scripted expert, the controls


def test_an_openvla_policy_reports_the_device_of_its_weights():
    from vla_bench.openvla.policy import OpenVLAPolicy

    class Base:
        model = __import__("torch").nn.Linear(2, 2).to("meta")

    policy = OpenVLAPolicy.__new__(OpenVLAPolicy)
    policy.base = Base()
    assert str(policy.device) == "meta"
