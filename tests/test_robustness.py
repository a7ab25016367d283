"""Robustness suites (LIBERO-PRO): naming, thresholds, instructions, test ids and -k, and the drop figure checked
against hand-computed cases."""
import math
import re

import numpy as np
import pytest
from scipy import stats

from vla_bench.errors import VlaBenchError
from vla_bench.metrics.verdicts import TaskOutcomes
from vla_bench.protocol import reference_protocol
from vla_bench.registry import Registry
from vla_bench.robustness import init_states_pair, robustness_drop
from vla_bench.suites import (ROBUSTNESS_BASES, ROBUSTNESS_FAMILIES, ROBUSTNESS_SUITES, base_suite, robustness_suite,
                              split_robustness_suite)
from vla_bench.thresholds import Threshold


def outcomes(successes: list[bool], start: int = 0) -> TaskOutcomes:
    return TaskOutcomes("task1", {start + i: s for i, s in enumerate(successes)})


def wilson(k, n):
    """scipy's Wilson interval: an implementation independent of vla_bench.metrics.intervals."""
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return ci.low, ci.high


# ---- the drop figure -------------------------------------------------------------------------------------------
def test_unpaired_drop_is_newcombes_interval_computed_by_hand():
    base = outcomes([True] * 45 + [False] * 5)
    perturbed = outcomes([True] * 20 + [False] * 30, start=100)  # other init states: nothing pairs
    d = robustness_drop(base, perturbed, paired=True)  # asked to pair, but no index pairs: unpaired
    assert not d.paired
    pb, pp = 0.9, 0.4
    lb, ub = wilson(45, 50)
    lp, up = wilson(20, 50)
    assert d.drop == pytest.approx(0.5)
    assert d.low == pytest.approx(0.5 - math.sqrt((pb - lb) ** 2 + (up - pp) ** 2), abs=1e-9)
    assert d.high == pytest.approx(0.5 + math.sqrt((ub - pb) ** 2 + (pp - lp) ** 2), abs=1e-9)
    assert (d.base_rate, d.perturbed_rate, d.base_episodes, d.perturbed_episodes) == (0.9, 0.4, 50, 50)
    # Boschloo's exact test, one-sided "the perturbed rate is lower", as scipy computes it
    table = [[20, 45], [30, 5]]  # rows: successes, failures; columns: perturbed, base
    assert d.pvalue == pytest.approx(stats.boschloo_exact(table, alternative="less").pvalue, rel=1e-3)


def test_paired_drop_uses_the_correlation_of_the_pairs():
    # 50 shared init states: 30 both succeed, 10 only unperturbed, 2 only perturbed, 8 neither
    pattern = [(True, True)] * 30 + [(True, False)] * 10 + [(False, True)] * 2 + [(False, False)] * 8
    base = outcomes([b for b, _ in pattern])
    perturbed = outcomes([p for _, p in pattern])
    d = robustness_drop(base, perturbed, paired=True)
    assert d.paired
    pb, pp = 40 / 50, 32 / 50
    lb, ub = wilson(40, 50)
    lp, up = wilson(32, 50)
    # Newcombe's phi: ad - bc = 30*8 - 10*2 = 220 > n/2, shrunk by 25 to 195, over sqrt(40*10*32*18) = 480
    phi = 195 / 480
    drop = pb - pp
    low = drop - math.sqrt((pb - lb) ** 2 - 2 * phi * (pb - lb) * (up - pp) + (up - pp) ** 2)
    high = drop + math.sqrt((ub - pb) ** 2 - 2 * phi * (ub - pb) * (pp - lp) + (pp - lp) ** 2)
    assert (d.drop, d.low, d.high) == pytest.approx((drop, low, high), abs=1e-9)
    # exact McNemar, one-sided: at least 10 of the 12 discordant pairs against the perturbed task
    assert d.pvalue == pytest.approx((66 + 12 + 1) / 4096)
    # pairing narrows the interval here: the same rates unpaired give a wider one
    unpaired = robustness_drop(base, perturbed, paired=False)
    assert not unpaired.paired and unpaired.high - unpaired.low > d.high - d.low


def test_uncorrelated_pairs_give_the_unpaired_interval():
    # ad - bc = 10*0 - 10*0 = 0: Newcombe's phi is 0 and the paired interval equals the unpaired one
    base = outcomes([True] * 20)
    perturbed = outcomes([True] * 10 + [False] * 10)
    paired, unpaired = robustness_drop(base, perturbed, True), robustness_drop(base, perturbed, False)
    assert paired.paired and not unpaired.paired
    assert (paired.low, paired.high) == pytest.approx((unpaired.low, unpaired.high), abs=1e-12)


def test_a_perturbation_that_helps_is_a_negative_drop():
    d = robustness_drop(outcomes([True] * 5 + [False] * 45), outcomes([True] * 40 + [False] * 10), paired=True)
    assert d.drop == pytest.approx(-0.7) and d.low < d.drop < d.high < 0
    assert d.pvalue > 0.5  # no evidence of a drop


def test_pairing_follows_the_init_states():
    states = np.random.default_rng(0).normal(size=(50, 9))
    assert init_states_pair(states, states.copy())
    assert not init_states_pair(states, states + 0.01)
    assert not init_states_pair(states, states[:40])


# ---- naming, protocol, thresholds, instructions ----------------------------------------------------------------
def test_robustness_suite_names_round_trip():
    assert len(ROBUSTNESS_SUITES) == len(ROBUSTNESS_FAMILIES) * len(ROBUSTNESS_BASES)
    for base in ROBUSTNESS_BASES:
        for family in ROBUSTNESS_FAMILIES:
            name = robustness_suite(base, family)
            assert split_robustness_suite(name) == (base, family) and base_suite(name) == base
    assert split_robustness_suite("libero_goal") is None and base_suite("libero_goal") == "libero_goal"
    assert split_robustness_suite("libero_goal_env") is None  # registered by LIBERO-PRO, but it ships no files
    with pytest.raises(VlaBenchError, match="valid: lan, object, swap, task"):
        robustness_suite("libero_goal", "env")
    with pytest.raises(VlaBenchError, match="LIBERO-PRO has no variants of 'libero_90'"):
        robustness_suite("libero_90", "lan")


def test_a_variant_keeps_its_base_suites_max_steps():
    assert reference_protocol("libero_10_swap").max_steps == reference_protocol("libero_10").max_steps == 520
    assert reference_protocol("libero_goal_lan", episodes=3).episodes == 3
    with pytest.raises(VlaBenchError, match="libero_goal_lan"):
        reference_protocol("libero_goal_bogus")


def test_variants_fall_back_to_the_libero_pro_thresholds(checkpoints_file):
    path = checkpoints_file("""
default = "a"
[thresholds.libero_pro]
default = 0.8
task3 = 0.5
[thresholds.libero_goal_swap]
default = 0.3
[checkpoints.a]
kind = "noop"
[checkpoints.b]
kind = "noop"
[checkpoints.b.thresholds.libero_pro]
default = 0.1
""")
    registry = Registry.load(path)
    a, b = registry.get("a"), registry.get("b")
    assert registry.threshold(a, "libero_goal_lan", "task1") == Threshold.success_rate(0.8)
    assert registry.threshold(a, "libero_goal_lan", "task3") == Threshold.success_rate(0.5)
    assert registry.threshold(a, "libero_goal_swap", "task3") == Threshold.success_rate(0.3)  # its own table
    assert registry.threshold(b, "libero_goal_lan", "task1") == Threshold.success_rate(0.1)  # the entry's
    with pytest.raises(VlaBenchError, match=r"\[thresholds.libero_goal\]"):
        registry.threshold(a, "libero_goal", "task1")  # a standard suite does not fall back


def test_reworded_instructions_come_from_the_task_file():
    from vla_bench.envs.tasks import suite_tasks

    base, lan, task = (suite_tasks(s)[0] for s in ("libero_goal", "libero_goal_lan", "libero_goal_task"))
    assert base.name == lan.name  # LIBERO-PRO keeps the file name, so LIBERO's own `language` would not change
    assert base.language == "open the middle drawer of the cabinet"
    assert lan.language == "open the cabinet’s middle drawer"
    assert task.language == "open the bottom drawer of the cabinet"
    for suite in ROBUSTNESS_SUITES:
        tasks = suite_tasks(suite)
        assert len(tasks) == len(suite_tasks(base_suite(suite)))
        assert all(t.language and "(" not in t.language for t in tasks)


# ---- test ids and -k -------------------------------------------------------------------------------------------
@pytest.fixture
def collected(project):
    """collected(*pytest args) -> (result, ids) of `pytest --collect-only suites/libero_pro` in a project of the
    test's own."""
    def collect(*args):
        result = project.run("--collect-only", "-q", "suites/libero_pro", "--checkpoint", "noop", *args)
        return result, re.findall(r"::test_task\[([^\]]+)\]", result.stdout)
    return collect


def test_robustness_ids_are_stable_and_ordered_by_family_base_task(collected):
    _, ids = collected()
    expected = [f"{base}_{family}-task{i}-noop" for family in ROBUSTNESS_FAMILIES for base in ROBUSTNESS_BASES
                for i in range(1, 11)]
    assert ids == expected


def test_k_selects_task_words_exactly_and_suite_names_as_usual(collected):
    result, ids = collected("-k", "task1")
    assert ids == [f"{base}_{family}-task1-noop" for family in ROBUSTNESS_FAMILIES for base in ROBUSTNESS_BASES]
    assert "144 deselected" in result.stdout
    _, ids = collected("-k", "libero_goal_lan and (task1 or task10)")
    assert ids == ["libero_goal_lan-task1-noop", "libero_goal_lan-task10-noop"]
    _, ids = collected("-k", "_swap and task2")
    assert ids == [f"{base}_swap-task2-noop" for base in ROBUSTNESS_BASES]


def test_equal_rates_show_no_drop_and_no_minus_sign():
    d = robustness_drop(outcomes([True] * 3), outcomes([True] * 3, start=10), paired=False)
    assert math.copysign(1.0, d.drop) == 1.0 and f"{d.drop:+.1%}" == "+0.0%"
    assert d.low == pytest.approx(-d.high)


# ---- end to end ------------------------------------------------------------------------------------------------
@pytest.mark.sim
def test_a_robustness_case_runs_both_tasks_and_reports_the_drop(project, tmp_path):
    """One expert episode of libero_spatial_lan task1 and of libero_spatial task1 (no cameras): both succeed, the
    summary shows the robustness row, and the JUnit properties carry the drop."""
    junit = tmp_path / "junit.xml"
    result = project.run("suites/libero_pro", "-k", "libero_spatial_lan and task1", "--checkpoint", "expert",
                         "--episodes", "1", "--vla-workers", "1", "--vla-results", str(tmp_path / "r.sqlite"),
                         f"--junitxml={junit}")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "robustness (LIBERO-PRO)" in output
    row = next(line for line in output.splitlines() if "│ lan" in line)
    assert "libero_spatial" in row and "100.0% (1/1)" in row and "+0.0%" in row and "unpaired" in row
    xml = junit.read_text()
    assert 'name="base_rate" value="1.0"' in xml and 'name="drop" value="0.0"' in xml


def test_families_share_one_unperturbed_run_per_task(tmp_path, checkpoints_file, monkeypatch):
    """evaluate_robustness runs the base task once per (checkpoint, task) however many families use it, and pairs
    nothing when the variant's init states differ from the base suite's (LIBERO-PRO's own samples)."""
    from vla_bench.evaluate import TaskResult
    from vla_bench.results import ResultsStore
    from vla_bench.session import EvalSession

    registry = Registry.load(checkpoints_file('default = "a"\n[thresholds.libero_pro]\ndefault = 0.5\n'
                                              '[checkpoints.a]\nkind = "noop"\n'))
    session = EvalSession(registry, ResultsStore(tmp_path / "r.sqlite"), episodes=4)
    calls = []

    def fake_evaluate(spec, suite, task_index, progress=None):
        calls.append(suite)
        wins = {"libero_goal": [True] * 4}.get(suite, [True, False, False, False])
        result = TaskResult(spec.name, suite, task_index, sum(wins), 4, 0, None, 0.0, Threshold.success_rate(0.5),
                            _outcomes=dict(enumerate(wins)))
        session.results.append(result)
        return result

    monkeypatch.setattr(session, "evaluate", fake_evaluate)
    lan = session.evaluate_robustness(registry.get("a"), "libero_goal_lan", 0)
    swap = session.evaluate_robustness(registry.get("a"), "libero_goal_swap", 0)
    assert calls == ["libero_goal", "libero_goal_lan", "libero_goal_swap"]
    assert lan.base is swap.base and [r.suite for r in session.results].count("libero_goal") == 1
    assert (lan.drop.drop, lan.drop.paired) == (0.75, False) and lan.passed is False
    assert (lan.family, lan.base_suite, lan.task_id) == ("lan", "libero_goal", "task1")
    assert session.robustness_results == [lan, swap]
    with pytest.raises(VlaBenchError, match="not a robustness suite"):
        session.evaluate_robustness(registry.get("a"), "libero_goal", 0)


def test_strict_sim_fails_a_robustness_case_whose_unperturbed_scenes_moved():
    """--vla-strict-sim holds for robustness cases too: a moved scene in the unperturbed twin fails the case, and
    without the option the case returns its result."""
    from types import SimpleNamespace

    from vla_bench import plugin
    from vla_bench.evaluate import TaskResult

    def task(suite, mismatches=()):
        return TaskResult("a", suite, 0, 1, 1, 0, 80.0, 1.0, Threshold.success_rate(0.5),
                          scene_mismatches=list(mismatches), _outcomes={0: True})

    result = SimpleNamespace(base=task("libero_spatial", ["init 0: akita_black_bowl_1 2.0 cm / 1.0 deg off"]),
                             perturbed=task("libero_spatial_lan"),
                             drop=SimpleNamespace(drop=0.0, low=-0.5, high=0.5, paired=False, pvalue=1.0))
    session = SimpleNamespace(registry=SimpleNamespace(get=lambda name: name),
                              protocol=lambda suite: SimpleNamespace(episodes=1),
                              evaluate_robustness=lambda spec, suite, task_index, progress_for: result)

    def runner(strict: bool):
        options = {"--vla-strict-sim": strict, "verbose": -1}
        config = SimpleNamespace(stash={plugin._STATE: SimpleNamespace(session=session)}, getoption=options.get)
        case = plugin.RobustnessCase("libero_spatial_lan", 0, "a")
        return plugin.RobustnessTaskRunner(config, case, SimpleNamespace(user_properties=[]))

    assert runner(strict=False).evaluate() is result
    with pytest.raises(pytest.fail.Exception, match="akita_black_bowl_1 2.0 cm"):
        runner(strict=True).evaluate()
