"""Stored baselines: round trips, comparability errors that say what differs, and the errors a user can hit."""
import json

import pytest

from vla_bench import baselines
from vla_bench.errors import VlaBenchError
from vla_bench.metrics.verdicts import FAIL, compare_suite
from vla_bench.protocol import reference_protocol


def run(name="base", suite="libero_spatial", tasks=None, **protocol_overrides):
    protocol = reference_protocol(suite)
    protocol_dict = {**protocol.as_dict(), **protocol_overrides}
    return baselines.make_baseline(
        name, suite=suite, protocol=protocol_dict, protocol_key=protocol.key(), checkpoint_name="expert",
        checkpoint_identity="scripted:abc123", versions={"vla_bench": "0.1.0", "libero": "x"},
        tasks=tasks if tasks is not None else {"task1": {i: i % 5 != 0 for i in range(50)},
                                               "task2": {i: True for i in range(50)}})


def test_save_and_load_round_trip(tmp_path):
    original = run()
    path = baselines.save_baseline(original, tmp_path)
    assert path == tmp_path / "base.json"
    loaded = baselines.load_baseline("base", tmp_path)
    assert loaded == original
    assert loaded.outcomes("task1").outcomes[5] is False  # init indices come back as ints, outcomes as bools
    on_disk = json.loads(path.read_text())
    assert on_disk["tasks"]["task1"]["0"] is False and on_disk["checkpoint"]["identity"] == "scripted:abc123"
    assert baselines.load_baseline(str(path)) == original  # by path, as `vla-bench gate A B` may pass


def test_default_folder_is_baselines_under_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    baselines.save_baseline(run("main"))
    assert (tmp_path / "baselines" / "main.json").is_file()
    assert baselines.list_baselines() == ["main"]


def test_missing_baseline_lists_the_present_ones(tmp_path):
    baselines.save_baseline(run("alpha"), tmp_path)
    baselines.save_baseline(run("beta"), tmp_path)
    with pytest.raises(VlaBenchError, match="no baseline named 'gamma'.*alpha, beta"):
        baselines.load_baseline("gamma", tmp_path)
    with pytest.raises(VlaBenchError, match="no baselines in .*--vla-save"):
        baselines.load_baseline("gamma", tmp_path / "empty")


def test_empty_run_and_bad_names_are_refused():
    with pytest.raises(VlaBenchError, match="no episodes"):
        run(tasks={})
    with pytest.raises(VlaBenchError, match="tasks without episodes: task2"):
        run(tasks={"task1": {0: True}, "task2": {}})
    with pytest.raises(VlaBenchError, match="invalid baseline name"):
        run(name="../escape")


def test_malformed_file_names_the_file(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(VlaBenchError, match="broken.json"):
        baselines.load_baseline("broken", tmp_path)
    data = run().as_json()
    data["tasks"]["task1"]["0"] = "yes"
    (tmp_path / "odd.json").write_text(json.dumps(data))
    with pytest.raises(VlaBenchError, match="tasks.task1"):
        baselines.load_baseline("odd", tmp_path)
    del data["suite"]
    (tmp_path / "short.json").write_text(json.dumps(data))
    with pytest.raises(VlaBenchError, match="missing keys suite"):
        baselines.load_baseline("short", tmp_path)


def test_comparable_runs_pass_and_fewer_episodes_are_fine():
    baselines.check_comparable(run(), run("cand"))
    fewer = run("cand", tasks={"task1": {i: True for i in range(20)}}, episodes=20)
    baselines.check_comparable(run(), fewer)  # -k task1 --episodes 20 is still comparable


def test_incomparable_runs_say_what_differs():
    with pytest.raises(VlaBenchError) as error:
        baselines.check_comparable(run(), run("cand", max_steps=300, camera_size=128))
    message = str(error.value)
    assert "protocol max_steps: baseline 220, candidate 300" in message
    assert "protocol camera_size: baseline 256, candidate 128" in message
    other_suite = run("cand", suite="libero_object")
    with pytest.raises(VlaBenchError, match="suite: baseline 'libero_spatial', candidate 'libero_object'"):
        baselines.check_comparable(run(), other_suite)
    shifted = run("cand", tasks={"task1": {i: True for i in range(45, 60)}, "task3": {0: True}})
    with pytest.raises(VlaBenchError) as error:
        baselines.check_comparable(run(), shifted)
    message = str(error.value)
    assert "tasks not in the baseline: task3" in message
    assert "task1: init states the baseline did not run: 50, 51" in message


def test_task_pairs_feed_the_gate():
    base = run()
    worse = run("cand", tasks={"task1": {i: i % 2 == 0 and i % 5 != 0 for i in range(50)},
                               "task2": {i: i % 10 != 0 for i in range(50)}})
    suite = compare_suite(baselines.task_pairs(base, worse))
    assert [t.task for t in suite.tasks] == ["task1", "task2"]
    assert suite.tasks[0].verdict == FAIL and suite.verdict == FAIL
