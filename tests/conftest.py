"""Shared test helpers: running pytest/vla-bench in a subprocess, as a user would from the repo root."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: the real Bridge V2 debug shard (25 episodes, MIT; see its README.md), kept in the repo so no test needs ../shared
BRIDGE_DEBUG = REPO / "tests" / "data" / "bridge_debug"


def sim_env(**extra) -> dict:
    env = dict(os.environ, MUJOCO_GL="egl", PYOPENGL_PLATFORM="egl", OPENBLAS_NUM_THREADS="1")
    env.pop("PYTEST_ADDOPTS", None)
    env.update(extra)
    return env


def run_pytest(*args: str, cwd: Path = REPO, timeout: float = 900, env: dict | None = None):
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env or sim_env())


@pytest.fixture
def checkpoints_file(tmp_path):
    """Write a checkpoints.toml in tmp_path from a string and return its path."""
    def write(text: str, name: str = "checkpoints.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path
    return write
