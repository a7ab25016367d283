"""Remote policies, both ways, on loopback sockets: `vla-bench serve` answers openpi's own client, the remote kind
drives a server built on vla-eval's own model-server base class, chunks execute by the one execution rule, a dead
server costs episodes (as errors) and never the run, and malformed messages are refused with errors that say what
was expected and what came."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import msgpack
import numpy as np
import pytest

from conftest import REPO, sim_env
from vla_bench.engine.pool import Answer
from vla_bench.errors import VlaBenchError
from vla_bench.policies import BuildContext, ModelCache, build_policy
from vla_bench.policies.base import SlotErrors
from vla_bench.policies.remote import RemoteIdentityWarning, _metadata
from vla_bench.protocol import reference_protocol
from vla_bench.registry import Registry
from tests.fake_pool import FakePool, rollout_episodes
from vla_bench.serve import codec
from vla_bench.serve.client import OpenpiConnection, Reliability, RemoteError
from vla_bench.serve.mapping import PRESETS
from vla_bench.serve.server import BackgroundServer, PolicyServer



def env_obs(seed: int = 0) -> dict:
    """A LIBERO-like observation (raw render orientation) with everything the presets read."""
    rng = np.random.default_rng(seed)
    return {"agentview_image": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
            "robot0_eye_in_hand_image": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
            "robot0_eef_pos": rng.normal(size=3), "robot0_eef_quat": np.array([0.0, 0.0, 0.0, 1.0]),
            "robot0_gripper_qpos": rng.normal(size=2)}


@pytest.fixture(autouse=True)
def _fresh_metadata_cache():
    _metadata.clear()  # servers come and go on reused ports between tests
    yield
    _metadata.clear()


class Echo:
    """A served policy whose action encodes what it saw: dims 0-2 the frame's mean per channel / 255, dim 3 the
    instruction's length, dim 6 the call's batch size (so tests can see the batch that reached the server)."""

    needs_images = True
    needs_privileged = False

    def __init__(self, action_repeat: int = 1, delay: float = 0.0):
        self.action_repeat = action_repeat
        self.delay = delay

    def reset(self, slot, seed):
        pass

    def act(self, observations, instructions, slots):
        time.sleep(self.delay)
        out = np.zeros((len(slots), 7))
        for k, (o, text) in enumerate(zip(observations, instructions)):
            out[k, :3] = o["agentview_image"].reshape(-1, 3).mean(axis=0) / 255.0
            out[k, 3] = len(text)
            out[k, 6] = len(slots)
        return out


def remote_registry(checkpoints_file, url: str, protocol: str, extra: str = "") -> Registry:
    return Registry.load(checkpoints_file(f'default = "r"\n[checkpoints.r]\nkind = "remote"\nurl = "{url}"\n'
                                          f'protocol = "{protocol}"\nretries = 1\nconnect_timeout = 5.0\n'
                                          f'call_timeout = 10.0\n{extra}'))


def remote_policy(checkpoints_file, url, protocol, extra=""):
    reg = remote_registry(checkpoints_file, url, protocol, extra)
    return build_policy(reg.get("r"), BuildContext(reg, "libero_spatial", ModelCache())), reg


# ---- the codec ------------------------------------------------------------------------------------------------
def test_codec_round_trips_with_openpi_and_vla_eval_conventions():
    """Arrays packed in either project's spelling are read back bit for bit by that project's own reader, and
    theirs by ours."""
    from openpi_client import msgpack_numpy
    from vla_eval.protocol.numpy_codec import decode_ndarray, encode_ndarray

    value = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([True, False]), "s": "text"}
    ours_openpi = msgpack_numpy.unpackb(codec.pack(value, "openpi"))
    ours_vla = msgpack.unpackb(codec.pack(value, "vla-eval"), object_hook=decode_ndarray, raw=False)
    theirs = [codec.unpack(msgpack_numpy.packb(value)),
              codec.unpack(msgpack.packb(value, default=encode_ndarray, use_bin_type=True))]
    for got in (ours_openpi, ours_vla, *theirs):
        assert got["s"] == "text" and got["a"].dtype == np.float32
        np.testing.assert_array_equal(got["a"], value["a"])
        np.testing.assert_array_equal(got["b"], value["b"])


@pytest.mark.parametrize("frame, needle", [
    (b"\xc1\x00not msgpack", "expected a msgpack message"),
    ("a text frame", "received a text frame"),
    (msgpack.packb({"__ndarray__": True, "data": b"\0" * 8, "dtype": "|O", "shape": [1]}), "refused array dtype"),
    (msgpack.packb({"__ndarray__": True, "data": b"\0" * 8, "dtype": "<c16", "shape": [1]}), "refused array dtype"),
    (msgpack.packb({"__ndarray__": True, "data": b"\0" * 7, "dtype": "<f8", "shape": [1]}), "needs 8 bytes, got 7"),
    (msgpack.packb(msgpack.ExtType(5, b"x")), "extension type 5"),
    (b"\x92" + b"\x00" * 40, "expected a msgpack message"),
])
def test_codec_refuses_what_is_not_plain_msgpack_with_numeric_arrays(frame, needle):
    with pytest.raises(codec.WireError, match=needle):
        codec.unpack(frame)


def test_codec_refuses_oversized_messages_and_object_arrays_on_send():
    with pytest.raises(codec.WireError, match="exceeds the limit of 100 bytes"):
        codec.unpack(codec.pack({"a": np.zeros(100)}), max_bytes=100)
    with pytest.raises(codec.WireError, match="dtype object"):
        codec.pack({"a": np.array([{"x": 1}], dtype=object)})


# ---- vla-bench serve <-> openpi-client ---------------------------------------------------------------------------
def test_serve_answers_openpi_clients_own_websocket_policy_and_batches_concurrent_clients():
    """openpi's WebsocketClientPolicy reads our metadata and gets an (H, 7) chunk for an openpi-LIBERO observation;
    concurrent clients share model calls (batch sizes above 1 reach the policy)."""
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    server = PolicyServer(Echo(action_repeat=3), {"checkpoint": "echo", "identity": "echo:1"}, "openpi",
                          PRESETS["openpi-libero"], max_batch=4, max_wait_s=0.2)
    with BackgroundServer(server) as bg:
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{bg.port}/health", timeout=5).read())
        assert health["status"] == "ok" and health["identity"] == "echo:1"
        clients = [WebsocketClientPolicy(bg.url) for _ in range(4)]
        assert clients[0].get_server_metadata()["identity"] == "echo:1"
        assert clients[0].get_server_metadata()["action_horizon"] == 3
        obs = PRESETS["openpi-libero"].wire_observation(env_obs(), "put the bowl on the plate")
        answers = [None] * 4

        def ask(k):
            answers[k] = clients[k].infer(obs)["actions"]

        threads = [threading.Thread(target=ask, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    for a in answers:
        assert a.shape == (3, 7)  # action_repeat 3: the rule's three steps as one chunk
        assert a[0, 3] == len("put the bowl on the plate")
        # the server turned the upright frame back to the render's orientation before the policy saw it
        np.testing.assert_allclose(a[0, :3], obs["observation/image"].reshape(-1, 3).mean(axis=0) / 255.0)
    assert max(server.batches) > 1, server.batches


def test_serve_refuses_garbage_object_dtypes_and_oversized_frames_with_clear_errors():
    """Each refusal reaches an openpi client as the server's error text, naming what was expected."""
    from websockets.sync.client import connect

    server = PolicyServer(Echo(), {"checkpoint": "echo"}, "openpi", PRESETS["openpi-libero"], max_bytes=1 << 20)
    with BackgroundServer(server) as bg:
        bad = {"non-msgpack": b"\xc1\xc1\xc1",
               "object dtype": msgpack.packb({"observation/image": {b"__ndarray__": True, b"data": b"\0" * 8,
                                                                    b"dtype": "|O", b"shape": [1]}}),
               "missing key": codec.pack({"prompt": "x"})}
        replies = {}
        for name, frame in bad.items():
            with connect(bg.url) as ws:
                ws.recv(timeout=5)  # metadata
                ws.send(frame)
                replies[name] = ws.recv(timeout=5)
        assert "expected a msgpack message" in replies["non-msgpack"]
        assert "refused array dtype object" in replies["object dtype"]
        assert "expected key 'observation/image'" in replies["missing key"]
        with connect(bg.url, max_size=None) as ws:
            ws.recv(timeout=5)
            ws.send(b"\0" * (2 << 20))
            with pytest.raises(Exception) as closed:
                ws.recv(timeout=5)
            assert closed.value.rcvd.code == 1009  # message too big


# ---- remote kind -> vla-eval's model server ---------------------------------------------------------------------
class _VlaEvalServer:
    """A model server built on vla-eval's PredictModelServer, served by vla-eval's own serve_async in a thread.
    Its action: dims 0-2 the agentview frame's channel means / 255, dim 3 the instruction length, dim 5 the step
    within its chunk; chunk_size 2, so vla-eval's base class buffers the second action itself."""

    def __init__(self):
        import anyio
        from vla_eval.model_servers.predict import PredictModelServer
        from vla_eval.model_servers.serve import serve_async

        class Model(PredictModelServer):
            def predict(self, obs, ctx):
                if obs["task_description"] == "boom":
                    raise RuntimeError("the model exploded")
                a = np.zeros((2, 7), dtype=np.float32)
                a[:, :3] = obs["images"]["agentview"].reshape(-1, 3).mean(axis=0) / 255.0
                a[:, 3] = len(obs["task_description"])
                a[:, 5] = [0, 1]
                a[:, 6] = -1.0
                return {"actions": a}

            def get_observation_params(self):
                return {"model": "vla-eval-test-model"}

        self.port = None
        ready = threading.Event()

        async def main():
            async with anyio.create_task_group() as tg:
                self.port = await tg.start(serve_async, Model(chunk_size=2), "127.0.0.1", 0)
                ready.set()
                await anyio.sleep_forever()

        threading.Thread(target=lambda: anyio.run(main), daemon=True).start()
        assert ready.wait(30)
        self.url = f"ws://127.0.0.1:{self.port}"


def test_remote_kind_evaluates_a_server_built_on_vla_evals_model_server(checkpoints_file):
    """The remote kind speaks vla-eval's protocol (hello, episode_start, observation -> action with the same seq)
    to vla-eval's own server: actions carry what the server saw, its chunk is buffered server-side, and the
    rollout engine runs episodes on it."""
    server = _VlaEvalServer()
    policy, reg = remote_policy(checkpoints_file, server.url, "vla-eval")
    assert "remote:vla-eval:" + server.url in reg.identity(reg.get("r"))
    assert policy.row_versions["server"]["metadata"]["observation_params"] == {"model": "vla-eval-test-model"}
    observations = [env_obs(1), env_obs(2)]
    policy.reset(0, 0)
    policy.reset(1, 0)
    first = policy.act(observations, ["a", "bb"], [0, 1])
    second = policy.act(observations, ["a", "bb"], [0, 1])
    for k, obs in enumerate(observations):
        upright = obs["agentview_image"][::-1, ::-1]
        np.testing.assert_allclose(first[k, :3], upright.reshape(-1, 3).mean(axis=0) / 255.0, rtol=1e-6)
    assert list(first[:, 3]) == [1, 2] and list(first[:, 5]) == [0, 0] and list(second[:, 5]) == [1, 1]
    policy.reset(0, 1)  # a new episode: vla-eval's server drops the rest of its chunk on episode_start
    assert policy.act(observations[:1], ["a"], [0])[0, 5] == 0
    policy.reset(1, 1)
    with pytest.raises(SlotErrors) as failed:  # the server's error message ends slot 1's episode, not slot 0's
        policy.act(observations, ["a", "boom"], [0, 1])
    assert list(failed.value.errors) == [1] and list(failed.value.actions) == [0]
    assert "(vla-eval protocol): the server reported an error" in failed.value.errors[1]
    assert "the model exploded" in failed.value.errors[1]

    outcomes = []
    rollout_episodes(policy, FakeEnv(2), reference_protocol("libero_spatial", max_steps=4), 0, "go", [0, 1, 2],
                     outcomes.append)
    assert sorted(o.init_index for o in outcomes) == [0, 1, 2]
    assert all(o.error is None and o.steps == 4 for o in outcomes)


# ---- chunks and resets ------------------------------------------------------------------------------------------
def test_remote_chunks_execute_replan_steps_and_a_reset_drops_the_rest(checkpoints_file):
    """A server answering 3-action chunks with replan_steps = 2: two actions run per request; a reset mid-chunk
    asks afresh at once."""
    server = PolicyServer(Echo(action_repeat=3), {"checkpoint": "echo"}, "openpi", PRESETS["openpi-libero"])
    with BackgroundServer(server) as bg:
        policy, _ = remote_policy(checkpoints_file, bg.url, "openpi", "replan_steps = 2\n")
        policy.reset(0, 0)
        obs = [env_obs()]
        for _ in range(5):
            policy.act(obs, ["x"], [0])
        assert policy.repeater.queries == 3  # steps 1, 3, 5
        policy.reset(0, 1)
        policy.act(obs, ["x"], [0])
        assert policy.repeater.queries == 4


def test_identity_names_url_and_metadata_and_a_silent_server_is_warned_about(checkpoints_file):
    server = PolicyServer(Echo(), {}, "openpi", PRESETS["openpi-libero"])
    server.metadata = {}  # an openpi server that reports nothing
    with BackgroundServer(server) as bg:
        reg = remote_registry(checkpoints_file, bg.url, "openpi")
        with pytest.warns(RemoteIdentityWarning, match="reports no metadata"):
            ident = reg.identity(reg.get("r"))
        assert ident.startswith(f"remote:openpi:{bg.url}:")


def test_a_server_that_is_not_there_is_a_clear_usage_error(checkpoints_file):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reg = remote_registry(checkpoints_file, f"ws://127.0.0.1:{port}", "openpi")
    with pytest.raises(VlaBenchError, match=rf"url: ws://127.0.0.1:{port} \(openpi protocol\): cannot connect"):
        reg.identity(reg.get("r"))


def test_remote_entries_are_validated_with_errors_naming_the_key(checkpoints_file):
    for extra, needle in [('protocol = "grpc"', "unknown protocol 'grpc'"), ('observation = "mine"',
                          "unknown preset 'mine'"), ('gripper = "up"', "unknown convention 'up'"),
                          ("replan_steps = 0", "replan_steps: must be an integer >= 1"),
                          ("normalized = true", "norm_stats: missing")]:
        text = ('default = "r"\n[checkpoints.r]\nkind = "remote"\nurl = "ws://h:1"\n' + extra + "\n")
        if "protocol" not in extra:
            text += 'protocol = "openpi"\n'
        with pytest.raises(VlaBenchError, match=needle):
            Registry.load(checkpoints_file(text))


def test_a_garbage_answer_is_an_error_naming_url_protocol_expected_and_received():
    """A fake openpi server that answers a non-msgpack frame, then one that answers a map without actions."""
    from websockets.sync.server import serve

    answers = iter([b"\xc1\xc1", codec.pack({"action": 1}), codec.pack({"actions": np.array(["a"], dtype="U1")
                                                                          .view(np.uint32)[:0]})])

    def handler(ws):
        ws.send(codec.pack({"model": "fake"}))
        for _ in ws:
            ws.send(next(answers))

    with serve(handler, "127.0.0.1", 0) as srv:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        url = f"ws://127.0.0.1:{srv.socket.getsockname()[1]}"
        conn = OpenpiConnection(url, Reliability(retries=1, call_timeout=5))
        assert conn.open() == {"model": "fake"}
        messages = []
        for _ in range(3):
            conn.send_observation({"x": 1})
            with pytest.raises(RemoteError) as e:
                conn.receive_actions()
            messages.append(str(e.value))
        srv.shutdown()
    assert all(m.startswith(f"{url} (openpi protocol): expected ") for m in messages), messages
    assert "not one" in messages[0] and "received a map with keys ['action']" in messages[1]
    assert "expected 'actions' of shape (H, D) or (D,) with numbers, received shape (0,)" in messages[2]


# ---- a server that dies ------------------------------------------------------------------------------------------
class FakeEnv:
    """A vectorized env with LIBERO-like observations that never succeeds; `on_step(n)` runs before step n."""

    def __init__(self, n, on_step=None, *args, **kwargs):
        self.n = n
        self.backend = "fake"
        self.on_step = on_step
        self.calls = 0

    def reset(self, requests):
        return {slot: Answer(env_obs(seed)) for slot, (_, seed) in requests.items()}

    def step(self, actions):
        self.calls += 1
        if self.on_step:
            self.on_step(self.calls)
        return {slot: Answer(env_obs(self.calls)) for slot in actions}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_noop(port: int) -> subprocess.Popen:
    """`vla-bench serve noop` in its own process (so that it can be killed), once its health endpoint answers."""
    proc = subprocess.Popen([sys.executable, "-m", "vla_bench.cli", "serve", "noop", "--checkpoints-file",
                             str(REPO / "checkpoints.toml"), "--host", "127.0.0.1", "--port", str(port)], cwd=REPO,
                            env=sim_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stdout.read())
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("vla-bench serve did not come up")


def test_a_killed_server_gives_error_episodes_and_the_run_resumes(checkpoints_file, tmp_path, monkeypatch):
    """SIGKILL of `vla-bench serve` mid-run: the episodes in flight and after are errors (naming URL and protocol),
    none is a failure; with the server back, the next run keeps the measured episodes and reruns the errors."""
    from vla_bench import evaluate
    from vla_bench.evaluate import EvalSettings, evaluate_task
    from vla_bench.results import ResultsStore

    port = _free_port()
    proc = _serve_noop(port)
    reg = remote_registry(checkpoints_file, f"ws://127.0.0.1:{port}", "openpi")
    spec = reg.get("r")
    protocol = reference_protocol("libero_spatial", episodes=6, max_steps=3)
    store = ResultsStore(tmp_path / "results.sqlite")

    def kill(n):
        if n == 4 and proc.poll() is None:  # episodes 0 and 1 took steps 1-3; 2 and 3 die mid-episode
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    def run(on_step):
        monkeypatch.setattr(evaluate, "WorkerPool", lambda n: FakePool(FakeEnv(2, on_step)))
        _metadata.clear()
        policy = build_policy(spec, BuildContext(reg, "libero_spatial", ModelCache()))
        return evaluate_task(policy, spec, reg.identity(spec), protocol, 0, store, EvalSettings(workers=2, groups=1))

    try:
        first = run(kill)
        assert first.episodes == 2 and first.errors == 4 and first.successes == 0
        errors = [r.error for r in store.episodes() if r.error]
        assert errors and all(f"ws://127.0.0.1:{port} (openpi protocol)" in e for e in errors)
        assert all(r.versions["server"]["metadata"]["checkpoint"] == "noop" for r in store.episodes())
        proc = _serve_noop(port)
        second = run(None)
        assert second.resumed == 2 and second.episodes == 6 and second.errors == 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)


def test_serve_shuts_down_gracefully_on_sigterm():
    port = _free_port()
    proc = _serve_noop(port)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "vla-bench serve: stopped" in out


# ---- the observation mapping ------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_frames_prepared_in_env_workers_equal_the_ones_the_policy_would_make(preset):
    """The mapping as an env worker's observation transform (pickled there and back, as spawn workers do) yields
    the same wire observation as mapping in the policy process, and the instruction never leaks into the
    prepared copy."""
    import pickle

    mapping = PRESETS[preset]
    obs = env_obs(3)
    direct = mapping.wire_observation(obs, "open the drawer")
    shipped = pickle.loads(pickle.dumps(pickle.loads(pickle.dumps(mapping))(dict(obs))))
    via_worker = mapping.wire_observation(shipped, "open the drawer")
    again = mapping.wire_observation(shipped, "close it")
    flat = lambda d, p="": {k2: v2 for k, v in d.items() for k2, v2 in (flat(v, p + k + ".").items()  # noqa: E731
                                                                      if isinstance(v, dict) else [(p + k, v)])}
    a, b = flat(direct), flat(via_worker)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert flat(again)[mapping.prompt_key] == "close it"


def test_presets_send_upright_padded_frames_and_the_state_layout_of_their_clients():
    from vla_bench.serve.mapping import quat_to_axis_angle, resize_frame

    wide = np.full((128, 256, 3), 200, np.uint8)
    padded = resize_frame(wide, 224, "pad")
    assert padded.shape == (224, 224, 3) and padded[:56].max() == 0 and padded[168:].max() == 0
    assert padded[60:164].min() == 200
    half = np.sqrt(0.5)
    np.testing.assert_allclose(quat_to_axis_angle([0, 0, half, half]), [0, 0, np.pi / 2])
    obs = env_obs(4)
    wire = PRESETS["openpi-libero"].wire_observation(obs, "x")
    assert wire["observation/image"].shape == (224, 224, 3) and wire["observation/state"].shape == (8,)
    np.testing.assert_array_equal(PRESETS["vla-eval-libero"].wire_observation(obs, "x")["images"]["agentview"],
                                  obs["agentview_image"][::-1, ::-1])


def test_serve_refuses_bad_arguments_with_a_one_line_error(capsys):
    from vla_bench import cli

    toml = str(REPO / "checkpoints.toml")
    assert cli.main(["serve", "noop", "--checkpoints-file", toml, "--protocol", "grpc"]) == 2
    assert "--protocol: unknown protocol 'grpc'; valid: openpi, vla-eval" in capsys.readouterr().err
    assert cli.main(["serve", "nope", "--checkpoints-file", toml]) == 2
    assert "unknown checkpoint 'nope'" in capsys.readouterr().err
    assert cli.main(["serve", "noop", "--checkpoints-file", toml, "--observation", "mine"]) == 2
    assert "--observation: unknown preset 'mine'; valid: openpi-libero, vla-eval-libero" in capsys.readouterr().err


def test_garbage_mid_episode_makes_that_episode_an_error_and_the_others_run_on(checkpoints_file):
    """A fake openpi server answers one request (the 5th) with bytes that are not msgpack: that episode is an
    error naming the URL and what came, the connection is replaced, and every other episode runs to the end."""
    from websockets.sync.server import serve

    count = [0]

    def handler(ws):
        ws.send(codec.pack({"model": "fake", "weights": "abc"}))
        for _ in ws:
            count[0] += 1
            ws.send(b"\xc1 not msgpack" if count[0] == 5 else codec.pack({"actions": np.zeros((1, 7))}))

    with serve(handler, "127.0.0.1", 0) as srv:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        url = f"ws://127.0.0.1:{srv.socket.getsockname()[1]}"
        policy, _ = remote_policy(checkpoints_file, url, "openpi")
        outcomes = []
        rollout_episodes(policy, FakeEnv(2), reference_protocol("libero_spatial", max_steps=4), 0, "go",
                         [0, 1, 2, 3], outcomes.append)
        srv.shutdown()
    errors = [o for o in outcomes if o.error]
    assert len(outcomes) == 4 and len(errors) == 1 and errors[0].success is False
    assert errors[0].error.startswith(f"{url} (openpi protocol): expected an action map: expected a msgpack message")
    assert all(o.steps == 4 for o in outcomes if not o.error)


def test_serve_answers_vla_evals_own_connection_with_png_frames():
    """vla-eval's own Connection (hello, episode_start, observation with its default PNG-encoded frame) gets one
    action per observation from `vla-bench serve --protocol vla-eval`, the chunk buffered server-side and dropped
    at the next episode_start."""
    import anyio
    from vla_eval.connection import Connection

    server = PolicyServer(Echo(action_repeat=2), {"checkpoint": "echo", "identity": "echo:2"}, "vla-eval",
                          PRESETS["vla-eval-libero"])
    obs = PRESETS["vla-eval-libero"].wire_observation(env_obs(5), "stack the bowls")

    async def session(url):
        async with Connection(url, timeout=10, max_retries=1) as conn:
            await conn.start_episode({"task": "x"})
            first, second, third = [await conn.act(obs) for _ in range(3)]
            await conn.start_episode({"task": "y"})
            fresh = await conn.act(obs)
            return conn.server_info, [np.asarray(a["actions"]) for a in (first, second, third, fresh)]

    with BackgroundServer(server) as bg:
        info, actions = anyio.run(session, bg.url)
    assert info["identity"] == "echo:2" and info["action_horizon"] == 2
    assert all(a.shape == (7,) for a in actions)
    np.testing.assert_allclose(actions[0][:3], obs["images"]["agentview"].reshape(-1, 3).mean(axis=0) / 255.0)
    assert server.batches == [1, 1, 1]  # steps 1 and 3 asked the model, step 2 came from the buffer; then anew


def test_another_model_at_the_same_url_mid_run_is_refused(checkpoints_file):
    """The server is replaced by one reporting other metadata: reconnections are refused (episode errors naming
    both), so its actions are never recorded under the first server's identity."""
    port = _free_port()
    first = BackgroundServer(PolicyServer(Echo(), {"checkpoint": "a"}, "openpi", PRESETS["openpi-libero"]),
                             port=port)
    policy, _ = remote_policy(checkpoints_file, first.url, "openpi")
    policy.reset(0, 0)
    policy.act([env_obs()], ["x"], [0])
    first.close()
    with BackgroundServer(PolicyServer(Echo(), {"checkpoint": "b"}, "openpi", PRESETS["openpi-libero"]),
                          port=port):
        with pytest.raises(SlotErrors):  # the old connection is gone
            policy.act([env_obs()], ["x"], [0])
        policy.reset(0, 1)
        with pytest.raises(SlotErrors) as refused:
            policy.act([env_obs()], ["x"], [0])
    message = refused.value.errors[0]
    assert "expected the server that began this run" in message
    assert '"checkpoint": "a"' in message and '"checkpoint": "b"' in message


def test_an_oversized_answer_is_refused_by_the_client_with_the_limit_named():
    from websockets.sync.server import serve

    def handler(ws):
        ws.send(codec.pack({"model": "fake"}))
        for _ in ws:
            ws.send(codec.pack({"actions": np.zeros((40_000, 7))}))  # 2.2 MB

    with serve(handler, "127.0.0.1", 0) as srv:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        url = f"ws://127.0.0.1:{srv.socket.getsockname()[1]}"
        conn = OpenpiConnection(url, Reliability(retries=1, call_timeout=5, max_bytes=1 << 20))
        conn.open()
        conn.send_observation({"x": 1})
        with pytest.raises(RemoteError, match="code 1009.*exceeded a size limit") as e:
            conn.receive_actions()
        srv.shutdown()
    assert str(e.value).startswith(f"{url} (openpi protocol): expected an action map, the connection ended")
