"""Action repeat, the execution rule of a temporally subsampled fine-tune: replaying an aggregated action undoes the
aggregation, per-env phases restart on reset and only due envs reach the model, the checkpoints.toml key is
validated, `vla-bench finetune --action-repeat k` writes it back, and an openvla entry replays it in the rollout
engine (tiny model, fake env: CPU, seconds)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from vla_bench.engine.pool import Answer
from vla_bench.errors import VlaBenchError
from vla_bench.finetune.data import aggregate_steps, execution_rule
from vla_bench.policies.repeat import ActionRepeater, replay, step_actions
from vla_bench.registry import Registry

OPEN, CLOSE = -1.0, 1.0
ENTRY = """default = "tiny-base"

[checkpoints.tiny-base]
kind = "openvla"
source = "snap"
"""

arm = arrays(np.float64, st.tuples(st.integers(1, 40), st.just(6)), elements=st.floats(-1, 1, width=32))


@st.composite
def episodes(draw):
    a = draw(arm)
    grip = draw(arrays(np.float64, len(a), elements=st.sampled_from([OPEN, CLOSE])))
    return np.concatenate([a, grip[:, None]], axis=1)


# ---- the rule ----------------------------------------------------------------------------------------------------
@settings(deadline=None, max_examples=60)
@given(episodes(), st.integers(1, 8))
def test_replay_of_an_aggregated_action_reproduces_its_window(actions, k):
    """For every window of k steps (the last one possibly shorter), the k env actions that replaying its aggregated
    action executes add up to the window's summed arm delta, and each of them commands the window's last gripper."""
    agg, starts = aggregate_steps(actions, k)
    repeater = ActionRepeater(k)
    executed = np.stack([repeater.act([0], lambda rows, i=i: agg[i:i + 1]) for i in range(len(agg))
                         for _ in range(k)])[:, 0]
    assert repeater.queries == len(agg)  # one model call per window
    np.testing.assert_array_equal(executed, replay(agg, k))  # the repeater executes exactly the rule
    for w, start in enumerate(starts):
        window, block = actions[start:start + k], executed[w * k:(w + 1) * k]
        np.testing.assert_allclose(block[:, :6].sum(0), window[:, :6].sum(0), atol=1e-9)
        assert np.all(block[:, 6] == window[-1, 6])


def test_the_rule_has_one_home():
    """finetune.data's execution_rule is the one evaluation replays: arm scaled by 1/k, gripper as predicted."""
    from vla_bench.policies import repeat

    assert execution_rule is repeat.execution_rule
    rule = execution_rule(4)
    a = np.array([0.4, -0.8, 0.2, 0.0, 0.1, -0.3, CLOSE])
    np.testing.assert_allclose(step_actions(a, 4), np.r_[a[:6] * rule["arm_scale"], a[6] * rule["gripper_scale"]])
    np.testing.assert_allclose(step_actions(a, 4), np.r_[a[:6] / 4, a[6]])
    np.testing.assert_array_equal(step_actions(a, 1), a)


# ---- per-env phases ----------------------------------------------------------------------------------------------
def test_counters_restart_on_reset_and_only_due_envs_are_queried():
    """Three envs in lockstep whose episodes restart at different steps: each is queried at its own episode's steps
    0, k, 2k, ..., a reset mid-window drops the held action, and a model call carries only the envs that are due."""
    k = 3
    repeater = ActionRepeater(k)
    slots = [0, 1, 2]
    calls, latest, counter = [], {}, iter(range(1, 1000))

    def query(rows):
        calls.append([slots[r] for r in rows])
        out = []
        for r in rows:
            latest[slots[r]] = float(next(counter))
            out.append([latest[slots[r]]] * 6 + [OPEN])
        return np.array(out)

    episode_step = {s: 0 for s in slots}
    resets = {2: [1], 4: [2], 5: [0]}  # lockstep step -> slots whose new episode starts there (mid-window)
    for t in range(9):
        for s in resets.get(t, []):
            repeater.reset(s)
            episode_step[s] = 0
        due = [slots[r] for r in repeater.due(slots)]
        assert due == [s for s in slots if episode_step[s] % k == 0], t
        out = repeater.act(slots, query)
        np.testing.assert_allclose(out[:, :6], np.array([[latest[s] / k] * 6 for s in slots]))
        assert np.all(out[:, 6] == OPEN)
        for s in slots:
            episode_step[s] += 1
    assert calls == [[0, 1, 2], [1], [0, 2], [2], [0, 1], [2], [0, 1]]


def test_slots_absent_from_a_call_keep_their_phase():
    """A slot left out of a call (its env is not stepped) neither advances nor loses its held action."""
    repeater = ActionRepeater(2)
    a = np.array([[2.0] * 6 + [CLOSE], [4.0] * 6 + [OPEN]])
    first = repeater.act([0, 1], lambda rows: a[rows])
    second = repeater.act([1], lambda rows: pytest.fail("slot 1 is mid-window"))
    third = repeater.act([0, 1], lambda rows: a[[0, 1]][rows] * 10)
    np.testing.assert_allclose(first[:, :6], [[1.0] * 6, [2.0] * 6])
    np.testing.assert_allclose(second, first[1:])
    np.testing.assert_allclose(third[0], first[0])  # slot 0's second step of its window
    np.testing.assert_allclose(third[1, :6], [20.0] * 6)  # slot 1's window ran out: a new prediction


# ---- the checkpoints.toml key ------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, message", [
    ("0", r"\[checkpoints.cand\] action_repeat: must be an integer >= 1 .*got 0"),
    ("-2", r"\[checkpoints.cand\] action_repeat: must be an integer >= 1 .*got -2"),
    ('"x"', r"\[checkpoints.cand\] action_repeat: expected int, got str 'x'"),
    ("2.0", r"\[checkpoints.cand\] action_repeat: expected int, got float 2.0"),
    ("true", r"\[checkpoints.cand\] action_repeat: expected int, got bool True"),
])
def test_a_bad_action_repeat_names_file_entry_and_key(checkpoints_file, value, message):
    path = checkpoints_file(ENTRY + f'\n[checkpoints.cand]\nkind = "openvla"\nbase = "tiny-base"\n'
                                    f'adapter = "run/adapter"\naction_repeat = {value}\n')
    with pytest.raises(VlaBenchError, match=message) as info:
        Registry.load(path)
    assert str(path) in str(info.value)


def _adapter_run(root: Path, execution: dict | None) -> Path:
    (root / "run" / "adapter").mkdir(parents=True)
    if execution is not None:
        (root / "run" / "train_config.json").write_text(json.dumps({"execution": execution}))
    return root / "run" / "adapter"


def test_the_entry_wins_over_the_run_config_which_wins_over_the_default(checkpoints_file, tmp_path):
    """action_repeat comes from the entry, else from the train_config.json `vla-bench finetune` wrote beside the
    adapter, else 1; an adapter does not inherit its base's."""
    from vla_bench.openvla.kind import action_repeat

    (tmp_path / "snap").mkdir()
    _adapter_run(tmp_path, execution_rule(3))
    text = ENTRY.replace('source = "snap"', 'source = "snap"\naction_repeat = 5') + "".join(
        f'\n[checkpoints.{n}]\nkind = "openvla"\nbase = "tiny-base"\nadapter = "run/adapter"\n{extra}'
        for n, extra in (("from-run", ""), ("from-entry", "action_repeat = 2\n")))
    reg = Registry.load(checkpoints_file(text))
    assert [action_repeat(reg.get(n), reg) for n in ("tiny-base", "from-run", "from-entry")] == [5, 3, 2]

    (tmp_path / "run" / "train_config.json").write_text(json.dumps({"execution": {"action_repeat": 0}}))
    with pytest.raises(VlaBenchError, match=r"train_config.json: execution.action_repeat: must be an integer >= 1"):
        action_repeat(reg.get("from-run"), reg)
    (tmp_path / "run" / "train_config.json").unlink()
    assert action_repeat(reg.get("from-run"), reg) == 1


# ---- write-back --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3])
def test_register_candidate_writes_action_repeat(checkpoints_file, tmp_path, k):
    """The finetune write-back records action_repeat = k for k > 1 (and leaves the key out for k = 1)."""
    from vla_bench.finetune.cli import register_candidate

    path = checkpoints_file(ENTRY)
    reg = Registry.load(path)
    register_candidate(reg, "cand", "tiny-base", {"adapter": str(tmp_path / "run" / "adapter")},
                       "libero_spatial_no_noops", "tiny-base", True, "a comment", action_repeat=k)
    text = path.read_text()
    assert ("action_repeat" in text) == (k > 1) and ("action_repeat = 3" in text) == (k == 3)
    spec = Registry.load(path).get("cand")
    assert spec.options.get("action_repeat", 1) == k


def test_finetune_command_passes_its_action_repeat_to_the_entry(checkpoints_file, tmp_path, monkeypatch):
    """`vla-bench finetune --action-repeat 2` (training stubbed out) writes the rule into train_config.json's data
    and `action_repeat = 2` into the new entry."""
    from vla_bench.data.libero_hdf5 import write_libero_demos
    from vla_bench.finetune import cli, examples, train

    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "config.json").write_text(json.dumps({"image_sizes": [224]}))
    demos = tmp_path / "demos" / "libero_spatial"
    rng = np.random.default_rng(0)
    write_libero_demos(demos / "t_demo.hdf5", [{"actions": np.c_[rng.normal(0, 0.3, (9, 6)), np.ones(9)],
                                                "obs": {"agentview_rgb": np.zeros((9, 8, 8, 3), np.uint8)}}
                                               for _ in range(2)], "do it")
    seen = {}

    def fake_train(cfg, train_set, val_set, norm_stats, extra):
        seen.update(extra)
        return {"adapter": str(Path(cfg.out) / "adapter"), "steps": 0, "final": {}}

    monkeypatch.setattr(examples, "prepare_examples", lambda *a, **k: None)
    monkeypatch.setattr(train, "train", fake_train)
    path = checkpoints_file(ENTRY)
    assert cli.main(["--checkpoints-file", str(path), "--base", "tiny-base", "--data", str(demos), "--name",
                     "cand", "--out", str(tmp_path / "run"), "--action-repeat", "2", "--workers", "0"]) == 0
    assert seen["execution"]["action_repeat"] == 2 and seen["execution"]["arm_scale"] == 0.5
    assert Registry.load(path).get("cand").options["action_repeat"] == 2


# ---- evaluation: an openvla entry in the rollout engine -------------------------------------------------------------
class StaggeredEnv:
    """Fake vectorized env: episode i succeeds after `length[i]` steps; every observation is a distinct frame that
    carries (episode, step) so the test can match model calls to env steps."""

    def __init__(self, n, length):
        self.n, self.length = n, length
        self.current, self.steps, self.executed = {}, {}, {}

    def _obs(self, slot):
        i, t = self.current[slot], self.steps[slot]
        frame = np.random.default_rng(100 * i + t).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        return {"agentview_image": frame, "episode": i, "t": t}

    def reset(self, requests):
        out = {}
        for slot, (init_index, seed) in requests.items():
            self.current[slot], self.steps[slot] = init_index, 0
            self.executed[init_index] = []
            out[slot] = Answer(self._obs(slot))
        return out

    def step(self, actions):
        out = {}
        for slot, action in actions.items():
            i = self.current[slot]
            self.executed[i].append(np.asarray(action))
            self.steps[slot] += 1
            out[slot] = Answer(self._obs(slot), done=self.steps[slot] >= self.length[i])
        return out


@pytest.fixture(scope="module")
def tiny_snapshot(tmp_path_factory):
    from vla_bench.openvla import tiny

    root = tmp_path_factory.mktemp("tiny")
    return tiny.write_tiny_snapshot(root / "snap", tiny.build_tokenizer(root / "tok"), seed=0)


def test_an_openvla_entry_replays_its_rule_in_the_rollout_engine(checkpoints_file, tiny_snapshot):
    """With action_repeat = 2 the engine's lockstep batches ask the model only for the envs at their episode's
    steps 0, 2, 4, ..., every env executes [a[0:6] / 2, a[6]] of its own latest prediction, an episode that starts
    in a freed slot mid-window starts with a fresh prediction, and the identity records the rule."""
    from vla_bench.policies import BuildContext, ModelCache, build_policy
    from vla_bench.protocol import reference_protocol
    from tests.fake_pool import rollout_episodes

    text = ENTRY.replace('"snap"', json.dumps(str(tiny_snapshot))) + (
        f'\n[checkpoints.rep]\nkind = "openvla"\nsource = {json.dumps(str(tiny_snapshot))}\naction_repeat = 2\n'
        f'\n[checkpoints.once]\nkind = "openvla"\nsource = {json.dumps(str(tiny_snapshot))}\naction_repeat = 1\n')
    reg = Registry.load(checkpoints_file(text))
    assert reg.identity(reg.get("once")) == reg.identity(reg.get("tiny-base"))  # k = 1 changes no identity
    assert reg.identity(reg.get("rep")) != reg.identity(reg.get("tiny-base"))
    policy = build_policy(reg.get("rep"), BuildContext(reg, "libero_spatial", ModelCache()))
    assert policy.action_repeat == 2

    queried, infer = [], policy.infer

    def spy(observations, instructions, return_logits=False):
        result = infer(observations, instructions, return_logits)
        queried.append([(o["episode"], o["t"], a) for o, a in zip(observations, result.actions)])
        return result

    policy.infer = spy
    length = {0: 3, 1: 6, 2: 4, 3: 5}  # episode 0 ends mid-window; episode 2 starts in its slot at lockstep step 3
    env = StaggeredEnv(2, length)
    outcomes = []
    rollout_episodes(policy, env, reference_protocol("libero_spatial", max_steps=10), 0, "put the bowl on the stove",
                     [0, 1, 2, 3], outcomes.append)
    assert sorted(o.init_index for o in outcomes) == [0, 1, 2, 3] and all(o.success for o in outcomes)

    predictions = {}
    for call in queried:
        assert 1 <= len(call) <= 2
        for episode, t, action in call:
            predictions[episode, t] = action
    for i, n in length.items():
        assert sorted(t for (e, t) in predictions if e == i) == list(range(0, n, 2))
        for t, executed in enumerate(env.executed[i]):
            np.testing.assert_allclose(executed, step_actions(predictions[i, t - t % 2], 2))
    assert any(len(call) == 1 for call in queried)  # staggered episodes: some calls carry one env only
