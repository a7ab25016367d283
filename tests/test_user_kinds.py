"""Checkpoint kinds of a user's own, through `vla_bench_checkpoint_kinds()` in a conftest.py or a `-p` plugin, each
run in its own temporary project (pytester); and what vla-bench makes of such a policy when it misbehaves: NaN, the
wrong shape, actions far outside the action space."""
import math
import re
import sqlite3

import pytest

from tests.conftest import BRIDGE_DEBUG, sim_env
from tests.test_bad_input import SEEN

pytest_plugins = ["pytester"]

#: a user's family module (the contract of vla_bench/policies/kinds.py): a policy that holds still, and from step
#: `at_step` of each episode on returns the misbehaviour named by `bad`
KIND_MODULE = '''
import numpy as np

KEYS = {"bad": str, "at_step": int}
REQUIRED = ()


def identity(spec, registry):
    return "user-kind:" + spec.options.get("bad", "none") + ":" + str(spec.options.get("at_step", 1))


class Misbehaving:
    needs_images = False
    needs_privileged = False
    device = "xla:0"  # what result rows must record, whatever the host

    def __init__(self, bad, at_step):
        self.bad, self.at_step, self.steps = bad, at_step, {}

    def reset(self, slot, seed):
        self.steps[slot] = 0

    def act(self, observations, instructions, slots):
        actions = np.zeros((len(slots), 7))
        actions[:, 6] = -1.0
        for k, slot in enumerate(slots):
            self.steps[slot] = self.steps.get(slot, 0) + 1
            if self.steps[slot] >= self.at_step:
                if self.bad == "nan":
                    actions[k, 0] = np.nan
                elif self.bad == "inf":
                    actions[k, 2] = -np.inf
                elif self.bad == "far":
                    actions[k, 1] = 40.0
                elif self.bad == "shape":
                    return actions[:, :6]
        return actions


def build(spec, context):
    return Misbehaving(spec.options.get("bad", "none"), spec.options.get("at_step", 1))
'''

SUITE_MODULES = {
    "test_libero": 'SUITE = "libero_spatial"\n\n\ndef test_task(libero_task):\n'
                   '    result = libero_task.evaluate()\n    assert result.passed, libero_task.describe(result)\n',
    "test_bridge": 'SUITE = "bridge_v2"\n\n\ndef test_metric(proxy_metric):\n'
                   '    figure = proxy_metric.evaluate()\n    assert figure.passed, proxy_metric.describe(figure)\n',
}


def project(pytester, entries: str, hook_in: str = "conftest", default: str = "mine") -> None:
    """A user's project: their kind module, the hook (in conftest.py or in a plugin module), two suites, and a
    checkpoints.toml with `entries`."""
    pytester.makepyfile(user_kind=KIND_MODULE, **SUITE_MODULES)
    hook = 'def vla_bench_checkpoint_kinds():\n    return {"misbehaving": "user_kind"}\n'
    if hook_in == "conftest":
        pytester.makeconftest(hook)
    else:
        pytester.makepyfile(**{hook_in: hook})
    pytester.makefile(".toml", checkpoints=f'default = "{default}"\n[thresholds.libero_spatial]\ndefault = 0.0\n'
                      f'[datasets.bridge_v2]\npath = "{BRIDGE_DEBUG}"\nsplit = "train"\n{entries}')


def run(pytester, *args):
    for key, value in sim_env().items():
        pytester._monkeypatch.setenv(key, value)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)


@pytest.mark.parametrize("hook_in", ["conftest", "my_plugin"])
def test_a_kind_from_a_conftest_or_a_p_plugin_is_used(pytester, hook_in):
    project(pytester, '[checkpoints.mine]\nkind = "misbehaving"\n', hook_in)
    result = run(pytester, "--collect-only", "-q", "test_libero.py",
                 *(("-p", hook_in) if hook_in != "conftest" else ()))
    assert "test_task[task1-mine]" in result.stdout.str(), result.stdout.str() + result.stderr.str()
    assert "unknown kind" not in result.stdout.str() + result.stderr.str()


def test_without_the_hook_the_kind_is_unknown(pytester):
    project(pytester, '[checkpoints.mine]\nkind = "misbehaving"\n', hook_in="not_loaded")
    result = run(pytester, "--collect-only", "-q", "test_libero.py")
    assert result.ret == 4
    assert "unknown kind 'misbehaving'" in result.stdout.str() + result.stderr.str()


def test_a_hook_returning_something_else_is_named(pytester):
    pytester.makepyfile(**SUITE_MODULES)
    pytester.makeconftest('def vla_bench_checkpoint_kinds():\n    return ["user_kind"]\n')
    pytester.makefile(".toml", checkpoints='default = "noop"\n[checkpoints.noop]\nkind = "noop"\n')
    result = run(pytester, "--collect-only", "-q", "test_libero.py")
    output = result.stdout.str() + result.stderr.str()
    assert result.ret == 4 and SEEN["a `vla_bench_checkpoint_kinds()` returning something else than {kind: module}"] \
        in output and "conftest.py" in output, output


def test_nan_predictions_fail_the_open_loop_suite_with_figures_stored_and_a_summary(pytester):
    project(pytester, '[checkpoints.mine]\nkind = "misbehaving"\nbad = "nan"\nat_step = 3\n')
    result = run(pytester, "test_bridge.py", "--vla-results", "r.sqlite")
    output = result.stdout.str()
    assert result.ret == 1, output + result.stderr.str()
    result.assert_outcomes(failed=5)
    assert output.count(SEEN["a policy returning NaN in an open-loop suite (its metrics fail)"]) >= 5
    assert "IntegrityError" not in output and "vla-bench: open-loop proxy metrics" in output
    from vla_bench.results import ResultsStore

    store = ResultsStore(pytester.path / "r.sqlite")
    figures = store.proxy_figures("mine", "bridge_v2")
    store.close()
    assert len(figures) == 12 and all(f["episodes"] == 25 for f in figures.values())
    assert math.isnan(figures["l1_physical"]["value"])  # stored, and read back as NaN


@pytest.mark.sim
def test_bad_closed_loop_actions_end_the_episode_as_an_error_naming_the_step(pytester):
    """In the simulator, as a user runs it (test_rollout_checks.py covers every kind of bad action without it)."""
    cases = {"nan": "a policy returning NaN or Inf in closed loop (an error, counted apart)",
             "shape": "a policy returning actions of the wrong shape in closed loop"}
    project(pytester, "".join(f'[checkpoints.{bad}]\nkind = "misbehaving"\nbad = "{bad}"\nat_step = 3\n'
                              for bad in cases), default="nan")
    result = run(pytester, "test_libero.py", "-k", "task1", "--episodes", "2", "--max-steps", "6",
                 "--vla-workers", "1", "--vla-results", "r.sqlite", *(f"--checkpoint={bad}" for bad in cases))
    output = result.stdout.str()
    result.assert_outcomes(failed=2)  # no measured episode to pass on, and no traceback
    for bad in cases:  # each test's own failure names its errors (the summary's width varies by terminal)
        assert re.search(rf"libero_spatial task1 {bad}: 0/0 .*2 episode\(s\) ended in errors", output), output
    with sqlite3.connect(pytester.path / "r.sqlite") as db:
        rows = db.execute("SELECT checkpoint, init_index, steps, error FROM episodes").fetchall()
        assert {d for d, in db.execute("SELECT device FROM episodes")} == {"xla:0"}  # the device really used
    assert sorted((c, i, steps) for c, i, steps, _ in rows) == sorted((c, i, 2) for c in cases for i in (0, 1))
    for checkpoint, _, _, error in rows:
        assert SEEN[cases[checkpoint]] in error and "step 3" in error, error
