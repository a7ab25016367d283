"""A served checkpoint is the same checkpoint: the tiny OpenVLA through `vla-bench serve` (either protocol) gives
the in-process actions bit for bit, and the same LIBERO episodes, episode for episode, through the pytest suite."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from conftest import REPO, run_pytest, sim_env
from test_remote import _free_port, env_obs
from vla_bench.policies import BuildContext, ModelCache, build_policy
from vla_bench.policies.remote import _metadata
from vla_bench.registry import Registry
from vla_bench.serve.cli import build_server
from vla_bench.serve.server import BackgroundServer


@pytest.fixture(scope="module")
def tiny_snapshot(tmp_path_factory):
    from vla_bench.openvla import tiny

    root = tmp_path_factory.mktemp("tiny")
    return tiny.write_tiny_snapshot(root / "snap", tiny.build_tokenizer(root / "tok"), seed=0)


def entries(snapshot, remote: str = "") -> str:
    return (f'default = "tiny"\n[checkpoints.tiny]\nkind = "openvla"\nsource = {json.dumps(str(snapshot))}\n'
            f'[checkpoints.rep]\nkind = "openvla"\nsource = {json.dumps(str(snapshot))}\naction_repeat = 2\n'
            f'[thresholds.libero_spatial]\ndefault = 0.0\n' + remote)


@pytest.mark.parametrize("protocol", ["openpi", "vla-eval"])
def test_a_served_checkpoint_gives_the_in_process_actions(protocol, tiny_snapshot, checkpoints_file):
    """An action_repeat = 2 entry served and evaluated remotely: every executed action equals the in-process
    policy's on the same observations, across steps (the rule's repeats arrive as a chunk) and a reset."""
    _metadata.clear()
    reg = Registry.load(checkpoints_file(entries(tiny_snapshot)))
    cache = ModelCache()
    local = build_policy(reg.get("rep"), BuildContext(reg, "libero_spatial", cache))
    server = build_server(reg, "rep", protocol, cache=cache)  # the same model cache: one model in memory
    assert cache.loads == 1
    with BackgroundServer(server) as bg:
        # image_size = 0: frames at the render size, as the in-process policy gets them
        reg = Registry.load(checkpoints_file(entries(tiny_snapshot, (
            f'[checkpoints.remote]\nkind = "remote"\nurl = "{bg.url}"\nprotocol = "{protocol}"\nimage_size = 0\n'))))
        remote = build_policy(reg.get("remote"), BuildContext(reg, "libero_spatial", ModelCache()))
        assert remote.row_versions["server"]["metadata"]["identity"] == reg.identity(reg.get("rep"))
        instructions = ["put the bowl on the plate", "open the middle drawer of the cabinet"]
        for policy in (local, remote):
            policy.reset(0, 0)
            policy.reset(1, 0)
        for step in range(5):
            if step == 3:  # a new episode in slot 1 mid-window: both ask afresh
                local.reset(1, 1)
                remote.reset(1, 1)
            observations = [env_obs(10 * step), env_obs(10 * step + 1)]
            np.testing.assert_array_equal(remote.act(observations, instructions, [0, 1]),
                                          local.act(observations, instructions, [0, 1]))
        remote.close()
    assert local.repeater.queries == 4  # steps 0, 2, 3 (slot 1) and 4
    # openpi carries the chunk to the client; vla-eval answers one action per observation, buffering the chunk
    assert remote.repeater.queries == (4 if protocol == "openpi" else 5)


def _serve(checkpoints: str, name: str, protocol: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "vla_bench.cli", "serve", name, "--checkpoints-file", checkpoints,
                             "--protocol", protocol, "--host", "127.0.0.1", "--port", str(port)], cwd=REPO,
                            env=sim_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in range(1200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stdout.read())
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("vla-bench serve did not come up")


@pytest.mark.sim
def test_the_remote_kind_gives_the_in_process_libero_episodes(tiny_snapshot, checkpoints_file, tmp_path):
    """`pytest suites/libero_spatial -k task1` with the tiny OpenVLA in-process and served over the openpi protocol
    (the vla-eval protocol's actions are checked bit for bit above, without the simulator): the same outcome and
    steps per episode, and the same frames (contact sheets byte for byte), so the same actions reached the
    simulator."""
    ports = {"openpi": _free_port()}
    remote = "".join(f'[checkpoints.tiny-{p}]\nkind = "remote"\nurl = "ws://127.0.0.1:{port}"\nprotocol = "{p}"\n'
                     'image_size = 0\nwrist_key = ""\nstate_key = ""\n' for p, port in ports.items())
    toml = checkpoints_file(entries(tiny_snapshot, remote))
    servers = [_serve(str(toml), "tiny", p, port) for p, port in ports.items()]
    try:
        db, videos = tmp_path / "r.sqlite", tmp_path / "videos"
        result = run_pytest("suites/libero_spatial", "-k", "task1", "--checkpoints-file", str(toml),
                            "--checkpoint", "tiny", "--checkpoint", "tiny-openpi", "--episodes", "2", "--max-steps",
                            "4", "--vla-workers", "1", "--vla-results", str(db),
                            "--video", "all", "--video-format", "sheet", "--video-dir", str(videos), "-rA")
    finally:
        for proc in servers:
            proc.terminate()
            proc.wait(30)
    assert result.returncode in (0, 1), result.stdout[-3000:]
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT checkpoint, init_index, success, steps, error FROM episodes").fetchall()
    by_checkpoint = {name: sorted(r[1:] for r in rows if r[0] == name) for name in ("tiny", "tiny-openpi")}
    assert len(by_checkpoint["tiny"]) == 2 and all(r[3] is None for r in by_checkpoint["tiny"])
    assert by_checkpoint["tiny-openpi"] == by_checkpoint["tiny"]
    sheets = {name: sorted((p.name, p.read_bytes()) for p in (videos / name).rglob("*.png"))
              for name in by_checkpoint}
    assert len(sheets["tiny"]) == 2 and sheets["tiny"][0][1] != sheets["tiny"][1][1]  # two different scenes
    assert sheets["tiny-openpi"] == sheets["tiny"]
