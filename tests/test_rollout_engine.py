"""The rollout engine's bookkeeping, against a fake vectorized env (no simulator): errors are counted apart from
failures, freed slots take the next queued episode, max_steps ends an episode, and on_done can stop scheduling."""
import numpy as np

from vla_bench.engine.pool import Answer
from vla_bench.policies.controls import NoopPolicy
from vla_bench.policies.capabilities import Capabilities
from vla_bench.protocol import reference_protocol
from tests.fake_pool import rollout_episodes


class FakeEnv:
    """Episode i succeeds after `succeed_at[i]` steps (None: never); init state 3 raises at step 2."""

    def __init__(self, n, succeed_at):
        self.n = n
        self.succeed_at = succeed_at
        self.current = {}
        self.steps = {}

    def reset(self, requests):
        out = {}
        for slot, (init_index, seed) in requests.items():
            self.current[slot], self.steps[slot] = init_index, 0
            out[slot] = Answer({"agentview_image": np.zeros((4, 4, 3), np.uint8)})
        return out

    def step(self, actions):
        out = {}
        for slot in actions:
            self.steps[slot] += 1
            i = self.current[slot]
            if i == 3 and self.steps[slot] == 2:
                out[slot] = Answer(None, error="simulator exploded")
            else:
                out[slot] = Answer({"agentview_image": np.zeros((4, 4, 3), np.uint8)},
                                       done=self.succeed_at.get(i) == self.steps[slot])
        return out


class Lockstep(NoopPolicy):
    """The noop control acting from the main process (as a model does), not inside the workers."""
    capabilities = Capabilities()


def run(n_slots, init_indices, succeed_at, max_steps=5, stop_after=None, frames=False):
    env = FakeEnv(n_slots, succeed_at)
    outcomes = []

    def on_done(o):
        outcomes.append(o)
        return stop_after is not None and len(outcomes) >= stop_after

    protocol = reference_protocol("libero_spatial", max_steps=max_steps)
    rollout_episodes(Lockstep(), env, protocol, 0, "do it", init_indices, on_done, record_frames=frames)
    return {o.init_index: o for o in outcomes}, protocol


def test_every_episode_is_reported_once_with_its_outcome():
    outcomes, protocol = run(2, [0, 1, 2, 3, 4], {0: 3, 2: 1, 4: 5})
    assert sorted(outcomes) == [0, 1, 2, 3, 4]
    assert [outcomes[i].success for i in range(5)] == [True, False, True, False, True]
    assert outcomes[3].error == "simulator exploded" and outcomes[1].error is None
    assert (outcomes[0].steps, outcomes[1].steps, outcomes[3].steps, outcomes[4].steps) == (3, 5, 2, 5)
    assert all(o.seed == protocol.episode_seed(0, i) for i, o in outcomes.items())


def test_on_done_returning_true_stops_scheduling_new_episodes():
    outcomes, _ = run(1, list(range(10)), {}, stop_after=3)
    assert sorted(outcomes) == [0, 1, 2]


def test_frames_cover_the_start_and_every_step():
    outcomes, _ = run(1, [0, 1], {0: 3}, frames=True)
    assert len(outcomes[0].frames) == 4 and len(outcomes[1].frames) == 6
