"""The regression gate as users drive it: `vla-bench gate` on stored runs, and --vla-compare / --vla-save /
--vla-curtail in pytest (cheap LIBERO runs of the negative controls)."""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, sim_env
from vla_bench.baselines import make_baseline, save_baseline
from vla_bench.protocol import reference_protocol


def stored_run(folder, name, rates_by_task, episodes=50, max_steps=None):
    """A run whose init state i succeeds when i < rate * episodes (so two runs pair up init state by state)."""
    protocol = reference_protocol("libero_spatial", episodes=episodes, max_steps=max_steps)
    tasks = {task: {i: i < round(rate * episodes) for i in range(episodes)} for task, rate in rates_by_task.items()}
    run = make_baseline(name, suite="libero_spatial", protocol=protocol.as_dict(), protocol_key=protocol.key(),
                        checkpoint_name=name, checkpoint_identity=name, versions={}, tasks=tasks)
    return save_baseline(run, folder)


def gate_cli(*args):
    return subprocess.run([sys.executable, "-m", "vla_bench.cli", "gate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_gate_passes_equal_runs_and_fails_a_30_point_drop(tmp_path):
    stored_run(tmp_path, "base", {"task1": 0.9, "task2": 0.9})
    stored_run(tmp_path, "same", {"task1": 0.9, "task2": 0.9})
    stored_run(tmp_path, "worse", {"task1": 0.6, "task2": 0.9})
    same = gate_cli("base", "same", "--baselines", str(tmp_path))
    assert same.returncode == 0 and "gate passed" in same.stdout
    worse = gate_cli("base", "worse", "--baselines", str(tmp_path))
    assert worse.returncode == 1, worse.stdout
    assert "failing tasks: task1" in worse.stdout and "-30.0%" in worse.stdout


def test_gate_refuses_runs_under_different_protocols_and_names_the_difference(tmp_path):
    stored_run(tmp_path, "base", {"task1": 0.9})
    stored_run(tmp_path, "short", {"task1": 0.9}, max_steps=100)
    result = gate_cli("base", "short", "--baselines", str(tmp_path))
    assert result.returncode == 2
    assert "protocol max_steps: baseline 220, candidate 100" in result.stderr


def test_gate_on_a_missing_baseline_lists_the_stored_ones(tmp_path):
    stored_run(tmp_path, "base", {"task1": 0.9})
    result = gate_cli("nope", "base", "--baselines", str(tmp_path))
    assert result.returncode == 2 and "no baseline named 'nope'; baselines in" in result.stderr
    assert result.stderr.rstrip().endswith("base")


@pytest.mark.sim
def test_save_then_compare_in_pytest_and_a_mismatched_protocol_stops_before_any_episode(project, tmp_path):
    common = ["suites/libero_spatial", "-k", "task1", "--checkpoint", "noop", "--episodes", "2",
              "--vla-results", str(tmp_path / "r.sqlite"), "--vla-baselines", str(tmp_path / "b")]
    saved = project.run(*common, "--max-steps", "8", "--vla-save", "noop-base")
    data = json.loads((tmp_path / "b" / "noop-base.json").read_text())
    assert data["tasks"] == {"task1": {"0": False, "1": False}} and data["protocol"]["max_steps"] == 8, saved.stdout
    compared = project.run(*common, "--max-steps", "8", "--vla-compare", "noop-base",
                           "--junitxml", str(tmp_path / "gate.xml"))
    assert "regression gate" in compared.stdout and "INCONCLUSIVE" in compared.stdout
    # CI systems (and scripts/e2e_finetune.py) read the verdict from the JUnit properties
    junit = (tmp_path / "gate.xml").read_text()
    assert 'name="gate_verdict" value="inconclusive"' in junit and 'name="gate_pvalue" value="1.0"' in junit
    mismatched = project.run(*common, "--max-steps", "9", "--vla-compare", "noop-base")
    assert "protocol max_steps: baseline 8, candidate 9" in mismatched.stdout
    assert "0/2" not in mismatched.stdout  # refused up front: no table row, no episodes


@pytest.mark.sim
def test_curtailment_stops_once_the_threshold_verdict_is_fixed_and_keeps_the_verdict(project, tmp_path):
    """noop fails every episode; with a 90% threshold over 10 episodes the verdict is fixed after 2 failures."""
    args = ["suites/libero_spatial", "-k", "task1", "--checkpoint", "noop", "--episodes", "10", "--max-steps", "5",
            "--vla-workers", "1", "--junitxml", str(tmp_path / "j.xml")]
    curtailed = project.run(*args, "--vla-curtail", "--vla-results", str(tmp_path / "c.sqlite"))
    full = project.run(*args, "--vla-results", str(tmp_path / "f.sqlite"))
    assert "1 failed" in curtailed.stdout and "1 failed" in full.stdout
    assert "0/2" in curtailed.stdout and "0/10" in full.stdout
    assert 'name="episodes_saved" value="0"' in (tmp_path / "j.xml").read_text()  # the full run's file


@pytest.mark.sim
def test_real_rollouts_expert_against_itself_passes_and_against_a_30_point_degradation_fails(project, tmp_path):
    """20 episodes of libero_spatial task 1: the expert's own baseline gates it as not worse, while the degraded
    expert (30% fumbles by episode seed; 8 of these 20 seeds fumble) fails the paired McNemar gate."""
    common = ["suites/libero_spatial", "-k", "task1", "--episodes", "20", "--vla-results", str(tmp_path / "r.sqlite"),
              "--vla-baselines", str(tmp_path / "b"), "-rA"]
    base = project.run(*common, "--checkpoint", "expert", "--vla-save", "expert-base")
    assert (tmp_path / "b" / "expert-base.json").is_file(), base.stdout[-3000:]
    same = project.run(*common, "--checkpoint", "expert", "--vla-compare", "expert-base")
    assert "PASSED suites/libero_spatial/test_libero_spatial.py::test_task[task1-expert]" in same.stdout, \
        same.stdout[-3000:]
    assert "(20 resumed)" in same.stdout  # the same checkpoint's episodes are not run twice
    worse = project.run(*common, "--checkpoint", "expert-fumbly", "--vla-compare", "expert-base")
    assert "FAILED suites/libero_spatial/test_libero_spatial.py::test_task[task1-expert-fumbly]" in worse.stdout, \
        worse.stdout[-3000:]
    assert "gate FAIL" in worse.stdout and worse.returncode == 1


def _sequential_case(candidate_success: bool):
    from vla_bench.gate import GateSettings, gate_task, stop_rule
    from vla_bench.metrics.verdicts import TaskOutcomes

    protocol = reference_protocol("libero_spatial")
    run = make_baseline("b", suite="libero_spatial", protocol=protocol.as_dict(), protocol_key=protocol.key(),
                        checkpoint_name="b", checkpoint_identity="b", versions={},
                        tasks={"task1": {i: True for i in range(50)}})
    settings = GateSettings.from_options(0.05, None, False, looks=5)
    rule = stop_rule(range(50), None, run.outcomes("task1"), settings, curtail=False)
    outcomes = lambda ids: {i: candidate_success for i in ids}  # noqa: E731
    return run, settings, rule, outcomes, gate_task


def test_sequential_gate_stops_a_clear_regression_at_an_early_look_and_fails_it():
    """Baseline 50/50, candidate failing everything: O'Brien-Fleming spends almost nothing at look 1 (10 pairs),
    so the gate stops at look 2 (20 pairs) with a failure; out-of-order episodes count only as a complete prefix."""
    run, settings, rule, outcomes, gate_task = _sequential_case(False)
    assert not rule(outcomes(range(10)))
    assert not rule(outcomes([*range(10), *range(11, 25)]))  # init state 10 still running: the prefix is 10 long
    assert rule(outcomes(range(20)))
    verdict = gate_task(run, "task1", outcomes(range(22)), settings, episodes=50)
    assert verdict.verdict == "fail" and "efficacy at look 2, 20 episodes" in verdict.test
    assert verdict.candidate_episodes == 20


def test_sequential_gate_stops_for_futility_when_the_candidate_is_not_behind():
    run, settings, rule, outcomes, gate_task = _sequential_case(True)
    assert not rule(outcomes(range(20)))  # futility only from half the planned episodes on
    assert rule(outcomes(range(30)))
    verdict = gate_task(run, "task1", outcomes(range(30)), settings, episodes=50)
    assert verdict.verdict != "fail" and "futility at look 3" in verdict.test


def test_sequential_gate_refuses_a_margin():
    from vla_bench.errors import VlaBenchError
    from vla_bench.gate import GateSettings

    with pytest.raises(VlaBenchError, match="--vla-sequential tests for any drop"):
        GateSettings.from_options(0.05, "drop:5pp", False, looks=5)
