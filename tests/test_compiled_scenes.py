"""Compiled LIBERO scenes kept as MuJoCo binary models (envs/compiled_scenes.py): a worker that loads one simulates
and renders exactly what a worker that compiled the XML does, and the cache stays correct and bounded."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import mujoco
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import REPO, sim_env
from vla_bench.envs import compiled_scenes

SMALL_SCENE = """<mujoco><worldbody><light pos="0 0 3"/><geom type="plane" size="1 1 .1"/>
  <body pos="0 0 .3"><freejoint/><geom size=".05"/></body></worldbody></mujoco>"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(compiled_scenes.ENV_VAR, str(tmp_path / "scenes"))
    return tmp_path / "scenes"


def same_model(a: mujoco.MjModel, b: mujoco.MjModel) -> bool:
    arrays = [name for name in dir(a) if isinstance(getattr(a, name, None), np.ndarray)]
    return len(arrays) > 50 and all(np.array_equal(getattr(a, n), getattr(b, n)) for n in arrays)


def test_a_scene_is_compiled_once_into_the_cache_and_then_loaded(cache, monkeypatch):
    first = compiled_scenes.load(SMALL_SCENE)
    files = list(cache.glob("*.mjb"))
    assert len(files) == 1 and not list(cache.glob("*.partial"))
    assert files[0].stat().st_mode & 0o044 == 0o044  # readable by the other users of a shared cache folder
    assert same_model(first, mujoco.MjModel.from_xml_string(SMALL_SCENE))

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(compiled_scenes, "_compile_into", no_compile)
    assert same_model(compiled_scenes.load(SMALL_SCENE), first)


def test_a_damaged_file_is_made_again(cache):
    """A cache file MuJoCo cannot read (cut short, overwritten) is replaced by a whole one and the model comes back
    right."""
    cache.mkdir(parents=True)
    path = cache / f"{compiled_scenes.scene_key(SMALL_SCENE)}.mjb"
    path.write_bytes(b"not a model")
    assert same_model(compiled_scenes.load(SMALL_SCENE), mujoco.MjModel.from_xml_string(SMALL_SCENE))
    assert same_model(mujoco.MjModel.from_binary_path(str(path)), mujoco.MjModel.from_xml_string(SMALL_SCENE))


def test_without_a_usable_cache_the_scene_is_compiled_in_the_process(tmp_path, monkeypatch):
    """An unwritable cache (here a file where the folder should be) and a cache turned off both still give the
    compiled model; a bad XML raises MuJoCo's own error, naming what is wrong."""
    (tmp_path / "a_file").write_text("")
    for setting in (str(tmp_path / "a_file" / "scenes"), "off"):
        monkeypatch.setenv(compiled_scenes.ENV_VAR, setting)
        assert same_model(compiled_scenes.load(SMALL_SCENE), mujoco.MjModel.from_xml_string(SMALL_SCENE))
    monkeypatch.setenv(compiled_scenes.ENV_VAR, str(tmp_path / "scenes"))
    with pytest.raises(ValueError, match="unknown"):
        compiled_scenes.load(SMALL_SCENE.replace("<light", "<unknown_element"))
    assert not list((tmp_path / "scenes").glob("*.mjb"))


def test_the_key_changes_with_the_xml_and_with_an_asset_file(tmp_path):
    texture = tmp_path / "floor.png"
    texture.write_bytes(b"one")
    xml = SMALL_SCENE.replace("<worldbody>", f'<asset><texture name="t" type="2d" file="{texture}"/></asset><worldbody>')
    key = compiled_scenes.scene_key(xml)
    assert compiled_scenes.scene_key(xml) == key
    assert compiled_scenes.scene_key(xml.replace('size=".05"', 'size=".06"')) != key
    texture.write_bytes(b"other bytes")
    assert compiled_scenes.scene_key(xml) != key


def test_workers_that_need_one_scene_at_once_share_one_whole_file(cache):
    """Four processes loading one new scene at once all get the model, and the cache ends with one whole file."""
    code = ("import sys; from vla_bench.envs import compiled_scenes; "
            "print(compiled_scenes.load(sys.stdin.read()).nbody)")
    env = dict(os.environ, **{compiled_scenes.ENV_VAR: str(cache)})
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPO, env=env) for _ in range(4)]
    for proc in procs:  # every process is started before any is given its scene
        proc.stdin.write(SMALL_SCENE)
        proc.stdin.close()
    results = [(proc.wait(120), proc.stdout.read().strip(), proc.stderr.read()) for proc in procs]
    assert all(rc == 0 and out == "2" for rc, out, _ in results), results  # the world and the ball
    assert len(list(cache.glob("*.mjb"))) == 1 and not list(cache.glob("*.partial"))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=12), st.integers(0, 200), st.data())
def test_eviction_keeps_the_most_recently_used_scenes_that_fit(tmp_path_factory, sizes, limit, data):
    """Whatever the files' sizes and use times, eviction deletes only the least recently used files, leaves the
    cache within the limit (or holding only the file just made), and never deletes that file."""
    directory = tmp_path_factory.mktemp("scenes")
    paths = []
    for i, size in enumerate(sizes):
        path = directory / f"{i}.mjb"
        path.write_bytes(b"x" * size)
        os.utime(path, ns=(i * 10**9, i * 10**9))  # file i was used at time i
        paths.append(path)
    keep = data.draw(st.sampled_from(paths))
    deleted = set(compiled_scenes.evict(directory, keep=keep, limit=limit))
    left = [p for p in paths if p.exists()]
    assert keep in left and deleted == set(paths) - set(left)
    assert sum(p.stat().st_size for p in left) <= limit or left == [keep]
    newest_deleted = max((paths.index(p) for p in deleted), default=-1)
    assert all(paths.index(p) > newest_deleted or p == keep for p in left)


@pytest.mark.sim
def test_a_loaded_scene_simulates_and_renders_like_a_compiled_one(tmp_path):
    """A LIBERO-Spatial env built from the cache's file and one that compiled its XML (the cache off) give equal
    qpos, qvel and solver warm start at every step of an episode of flailing actions, and equal camera frames."""
    script = textwrap.dedent(f"""
        import os
        import numpy as np
        from vla_bench.envs import compiled_scenes
        from vla_bench.envs.libero import LiberoTaskEnv
        from vla_bench.protocol import reference_protocol

        def build(cache):
            os.environ[compiled_scenes.ENV_VAR] = cache
            return LiberoTaskEnv(reference_protocol("libero_spatial"), 0, ("agentview",))

        def state(env):
            data = env.env.sim.data
            return np.concatenate([data.qpos, data.qvel, data.qacc_warmstart])

        cache = {str(tmp_path / "scenes")!r}
        compiled, loaded = build("off"), build(cache)
        assert len(os.listdir(cache)) == 2  # the scene's file and its lock
        rng = np.random.default_rng(0)
        frames = [(compiled.reset(3, 7), loaded.reset(3, 7))]
        for step in range(40):
            action = np.concatenate([rng.normal(0, 0.6, 6), [1.0 if (step // 10) % 2 else -1.0]])
            frames.append((compiled.step(action)[0], loaded.step(action)[0]))
            assert np.array_equal(state(compiled), state(loaded)), step
        for a, b in frames:
            assert np.array_equal(a["agentview_image"], b["agentview_image"])
        assert not np.array_equal(frames[0][0]["agentview_image"], frames[-1][0]["agentview_image"])
        print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=sim_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
