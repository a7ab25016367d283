"""The model's texture data is given back to the OS once the env's render context holds it (envs/texture_memory.py):
less memory per worker, the same physics and the same camera frames."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import mujoco
import numpy as np
import pytest

from tests.conftest import REPO, sim_env
from vla_bench.envs import texture_memory

TEXTURED = """<mujoco><asset>
  <texture name="floor" type="2d" builtin="checker" width="2048" height="2048" rgb1="1 0 0" rgb2="0 1 0"/>
  <material name="floor" texture="floor"/></asset>
  <worldbody><light pos="0 0 3"/><geom type="plane" size="1 1 .1" material="floor"/>
  <body pos="0 0 .3"><freejoint/><geom size=".05"/></body></worldbody></mujoco>"""


def resident_bytes() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Rss:"))


def trajectory(model: mujoco.MjModel, steps: int = 200) -> np.ndarray:
    data = mujoco.MjData(model)
    data.qvel[:3] = (0.3, -0.2, 1.0)
    out = []
    for _ in range(steps):
        mujoco.mj_step(model, data)
        out.append(data.qpos.copy())
    return np.array(out)


def test_release_gives_the_texture_pages_back_and_leaves_the_physics(monkeypatch):
    monkeypatch.delenv(texture_memory.ENV_VAR, raising=False)
    model = mujoco.MjModel.from_xml_string(TEXTURED)
    pixels = texture_memory.texture_data(model)
    assert pixels.nbytes == 2048 * 2048 * 3 and pixels.any()
    expected = trajectory(mujoco.MjModel.from_xml_string(TEXTURED))
    before = resident_bytes()
    released = texture_memory.release(model)
    after = resident_bytes()
    assert released >= pixels.nbytes - 2 * 4096
    assert before - after >= 0.9 * released  # the process really holds that much less
    assert not pixels[4096:-4096].any()  # what is read there now is the kernel's zero pages
    np.testing.assert_array_equal(trajectory(model), expected)


def test_textures_are_kept_when_asked(monkeypatch):
    monkeypatch.setenv(texture_memory.ENV_VAR, "1")
    model = mujoco.MjModel.from_xml_string(TEXTURED)
    copy = texture_memory.texture_data(model).copy()
    assert texture_memory.release(model) == 0
    np.testing.assert_array_equal(texture_memory.texture_data(model), copy)


@pytest.mark.sim
def test_a_libero_worker_without_its_texture_data_renders_the_same_frames():
    """A LIBERO-Spatial env whose model gave its textures back renders the same camera frames as one that kept
    them, over an episode start, 20 steps and a second start; a render context made after the release (which would
    upload zeros) stops the next step with an error naming how to keep the textures."""
    script = textwrap.dedent("""
        import os
        import numpy as np
        from vla_bench.envs import texture_memory
        from vla_bench.envs.libero import LiberoTaskEnv
        from vla_bench.protocol import reference_protocol

        def build(keep):
            os.environ[texture_memory.ENV_VAR] = "1" if keep else "0"
            return LiberoTaskEnv(reference_protocol("libero_spatial"), 0, ("agentview",))

        kept, released = build(True), build(False)
        assert texture_memory.texture_data(kept.env.sim.model._model).any()
        assert not texture_memory.texture_data(released.env.sim.model._model)[4096:-4096].any()
        rng = np.random.default_rng(0)
        pairs = [(kept.reset(2, 5), released.reset(2, 5))]
        for step in range(20):
            action = np.concatenate([rng.normal(0, 0.5, 6), [-1.0]])
            pairs.append((kept.step(action)[0], released.step(action)[0]))
        pairs.append((kept.reset(4, 9), released.reset(4, 9)))
        for a, b in pairs:
            assert np.array_equal(a["agentview_image"], b["agentview_image"])
        assert pairs[0][1]["agentview_image"].std() > 10  # a real picture, not a blank one

        from robosuite.utils.binding_utils import MjRenderContextOffscreen
        MjRenderContextOffscreen(released.env.sim, device_id=-1)  # robosuite's way to replace a context
        try:
            released.step(np.zeros(7))
        except RuntimeError as error:
            assert texture_memory.ENV_VAR in str(error), error
        else:
            raise AssertionError("a step rendered through a context made after the release")
        print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=sim_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
