"""Building a LIBERO scene's MuJoCo model in a worker: compiling its XML (the baseline, what every worker did) against
loading the compiled file from the scene cache (envs/compiled_scenes.py), in the same run, on LIBERO-Spatial's scene.

    .venv/bin/python -m pytest benchmarks/bench_scene_load.py --benchmark-only --benchmark-group-by=group

The memory each way is in extra_info: the process's private memory after the build, in a fresh child process each
(the compiler's leftovers stay for the life of a process, so in-process figures would mix).
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import mujoco
import pytest

from vla_bench.envs import compiled_scenes

SCENE_XML = textwrap.dedent("""
    import sys
    from libero.libero.envs.env_wrapper import ControlEnv
    from vla_bench.envs.tasks import suite_tasks
    env = ControlEnv(bddl_file_name=suite_tasks("libero_spatial")[0].bddl_path, has_renderer=False,
                     has_offscreen_renderer=False, use_camera_obs=False, hard_reset=False)
    open(sys.argv[1], "w").write(env.sim.model.get_xml())
""")
PRIVATE_MIB_AFTER = textwrap.dedent("""
    import sys, mujoco
    def private():
        with open("/proc/self/smaps_rollup") as f:
            fields = {l.split(":")[0]: int(l.split()[1]) for l in f if l.strip().endswith("kB")}
        return fields["Private_Clean"] + fields["Private_Dirty"]
    before = private()
    model = (mujoco.MjModel.from_xml_path(sys.argv[2]) if sys.argv[1] == "compile"
             else mujoco.MjModel.from_binary_path(sys.argv[2]))
    print((private() - before) // 1024)
""")


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scene")
    xml_path = folder / "spatial.xml"
    subprocess.run([sys.executable, "-c", SCENE_XML, str(xml_path)], check=True, capture_output=True,
                   env={**__import__("os").environ, "MUJOCO_GL": "egl"})
    xml = xml_path.read_text()
    mjb = folder / "spatial.mjb"
    mujoco.mj_saveModel(mujoco.MjModel.from_xml_string(xml), str(mjb), None)
    return xml, xml_path, mjb


def private_mib_after(how: str, path) -> int:
    out = subprocess.run([sys.executable, "-c", PRIVATE_MIB_AFTER, how, str(path)], check=True,
                         capture_output=True, text=True)
    return int(out.stdout.strip())


@pytest.mark.parametrize("how", ["load-compiled", "compile-baseline"])
def test_scene_build(benchmark, scene, how):
    xml, xml_path, mjb = scene
    benchmark.group = "LIBERO-Spatial scene model"
    if how == "compile-baseline":
        model = benchmark.pedantic(mujoco.MjModel.from_xml_string, args=(xml,), rounds=3, iterations=1)
        benchmark.extra_info["private_mib"] = private_mib_after("compile", xml_path)
    else:
        model = benchmark.pedantic(mujoco.MjModel.from_binary_path, args=(str(mjb),), rounds=3, iterations=1)
        benchmark.extra_info["private_mib"] = private_mib_after("load", mjb)
    assert model.nbody > 30 and compiled_scenes.scene_key(xml)
    print(how, benchmark.extra_info)
