"""The homes of shared facts: the suites registry, the one Threshold type, and the options that the plugin and the
CLI declare once."""
import argparse

import numpy as np
import pytest
from hypothesis import given, strategies as st

from vla_bench import gripper
from vla_bench.errors import VlaBenchError
from vla_bench.options import OptionValues, add_evaluation_options
from vla_bench.protocol import reference_protocol
from vla_bench.suites import CLOSED_LOOP, OPEN_LOOP, SUITES, get_suite, suite_names
from vla_bench.thresholds import Threshold


# ---- suites ---------------------------------------------------------------------------------------------------------
def test_unknown_suites_are_refused_in_one_place_with_the_valid_choices():
    with pytest.raises(VlaBenchError, match=r"unknown suite 'libero_100'; valid suites: libero_spatial, .*bridge_v2"):
        get_suite("libero_100")
    with pytest.raises(VlaBenchError, match=r"unknown closed loop suite 'bridge_v2'; valid suites: libero_spatial, "
                                            r"libero_object, libero_goal, libero_10, libero_90, libero_spatial_lan, "):
        get_suite("bridge_v2", CLOSED_LOOP)
    with pytest.raises(VlaBenchError, match="unknown open loop suite 'libero_goal'; valid suites: bridge_v2, "
                                            "libero_demos"):
        get_suite("libero_goal", OPEN_LOOP)
    # every place that used to check on its own now asks the registry, so it says the same
    with pytest.raises(VlaBenchError, match="unknown closed loop suite 'bridge_v2'"):
        reference_protocol("bridge_v2")


def test_every_closed_loop_record_drives_the_protocol_and_every_open_loop_record_names_a_data_source():
    for name in suite_names(CLOSED_LOOP):
        record, protocol = get_suite(name), reference_protocol(name)
        assert (protocol.max_steps, protocol.wait_steps, protocol.camera_size) == \
            (record.max_steps, record.wait_steps, record.camera_size)
        base = record.base or name  # a robustness variant keeps its base suite's conventions and numbers
        assert record.unnorm_keys == (base, f"{base}_no_noops") and record.gripper == gripper.OPEN_IS_MINUS_1
        assert record.max_steps == get_suite(base).max_steps
    assert {get_suite(n).data_source for n in suite_names(OPEN_LOOP)} == {"bridge_rlds", "libero_hdf5"}
    assert set(suite_names(CLOSED_LOOP)) | set(suite_names(OPEN_LOOP)) == set(SUITES)


def test_a_record_refuses_conventions_it_cannot_mean():
    from vla_bench.suites import Suite

    with pytest.raises(VlaBenchError, match="unknown gripper convention 'open'"):
        Suite("x", OPEN_LOOP, "x", gripper="open", data_source="libero_hdf5")
    with pytest.raises(ValueError, match="needs max_steps and task_source"):
        Suite("x", CLOSED_LOOP, "x")


@given(st.lists(st.sampled_from([-1.0, 1.0]), min_size=1, max_size=20))
def test_libero_commands_survive_the_trip_through_the_training_convention(commands):
    """A LIBERO gripper command (-1 open, +1 close) mapped to the training convention and back is the same command,
    and both sides agree on which frames are open."""
    g = np.array(commands)
    trained = gripper.libero_to_training(g)
    back = gripper.postprocess(np.c_[np.zeros((len(g), 6)), trained], gripper.OPEN_IS_MINUS_1)[:, -1]
    assert np.array_equal(back, g)
    assert np.array_equal(gripper.is_open(trained, gripper.OPEN_IS_1), gripper.is_open(g, gripper.OPEN_IS_MINUS_1))


# ---- thresholds -----------------------------------------------------------------------------------------------------
def test_one_threshold_type_for_success_rates_and_proxy_metrics():
    rate, band = Threshold.success_rate(0.9), Threshold.success_rate([0.1, 0.2])
    assert rate.passes(0.9) and not rate.passes(0.89) and rate.describe() == ">= 90%" and rate.as_plain() == 0.9
    assert band.passes(0.15) and not band.passes(0.25) and band.describe() == "[10%, 20%]"
    assert band.as_plain() == (0.1, 0.2) and not band.is_minimum and rate.is_minimum
    strict = Threshold(0.55, inclusive=False)
    assert not strict.passes(0.55) and strict.passes(0.5501) and strict.describe() == "> 0.55"
    capped = Threshold(0.5, warn_above=0.8)
    assert capped.describe() == ">= 0.50 (expected <= 0.80)" and capped.warning(0.9) and capped.warning(0.7) is None
    assert not any(t.passes(float("nan")) for t in (rate, band, strict, capped))


# ---- options --------------------------------------------------------------------------------------------------------
class Recorder:
    """An addoption-like callable that records what is declared."""

    def __init__(self):
        self.options = {}

    def __call__(self, *names, **kwargs):
        self.options[names[0]] = kwargs


def test_the_plugin_and_vla_bench_run_declare_the_same_options_with_the_same_defaults():
    plugin, cli = Recorder(), Recorder()
    add_evaluation_options(plugin, prefix="vla-")
    add_evaluation_options(cli, prefix="")
    assert len(plugin.options) == len(cli.options)
    as_plugin = OptionValues(lambda dest: dest, prefix="vla-")
    as_cli = OptionValues(lambda dest: dest, prefix="")
    for name in ("results", "baselines", "alpha", "compare-fail", "strict", "workers", "data", "save", "compare",
                 "curtail", "sequential", "strict-sim", "trajectories", "episodes", "max-steps", "checkpoint", "video",
                 "video-dir"):
        plugin_flag, cli_flag = as_plugin.flag(name), as_cli.flag(name)
        assert plugin.options[plugin_flag] == cli.options[cli_flag], name
    assert as_plugin.flag("alpha") == "--vla-alpha" and as_cli.flag("compare-fail") == "--fail"


def test_option_values_read_back_what_argparse_parsed():
    parser = argparse.ArgumentParser()
    add_evaluation_options(parser.add_argument, prefix="")
    args = parser.parse_args(["--alpha", "0.01", "--fail", "drop:5pp", "--data", "bridge_v2=/d", "--episodes", "3"])
    values = OptionValues(lambda dest: getattr(args, dest), prefix="")
    assert (values("alpha"), values("compare-fail"), values("data"), values("episodes")) == \
        (0.01, "drop:5pp", ["bridge_v2=/d"], 3)
    assert values("results") == "results/vla-bench.sqlite" and values("baselines") == "baselines"


# ---- vla-bench run --------------------------------------------------------------------------------------------------
@pytest.mark.sim
def test_vla_bench_run_evaluates_like_pytest_and_resumes_from_the_same_store(project, tmp_path):
    """`vla-bench run` over the same session: the negative control fails its task (exit 1), its episodes are stored,
    and a second run takes them from the store instead of re-running them."""
    import subprocess
    import sys

    from tests.conftest import sim_env
    from vla_bench.results import ResultsStore

    results = tmp_path / "r.sqlite"
    command = [sys.executable, "-m", "vla_bench.cli", "run", "libero_spatial", "--tasks", "1", "--checkpoint",
               "noop", "--episodes", "2", "--max-steps", "5", "--workers", "1", "--results", str(results)]
    first = subprocess.run(command, cwd=project.path, env=sim_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "libero_spatial task1 noop: 0/2 = 0.0%" in first.stdout and "threshold >= 90%" in first.stdout
    assert len(ResultsStore(results).episodes(checkpoint="noop")) == 2
    second = subprocess.run(command, cwd=project.path, env=sim_env(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 1 and "(2 resumed)" in second.stdout, second.stdout
    unknown = subprocess.run([sys.executable, "-m", "vla_bench.cli", "run", "libero_100"], cwd=project.path,
                             env=sim_env(), capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2 and "unknown suite 'libero_100'; valid suites: libero_spatial" in unknown.stderr
