"""Checkpoint kind "remote": a policy served elsewhere, over openpi's or vla-eval's websocket protocol.

    [checkpoints.pi05-libero]
    kind = "remote"
    url = "ws://gpu-host:8000"
    protocol = "openpi"             # or "vla-eval"
    observation = "openpi-libero"   # preset of what is sent (default: the protocol's LIBERO preset; see
                                    # vla_bench/serve/mapping.py); image_key, wrist_key, state_key, state_layout,
                                    # prompt_key, image_size, resize, upright override one part of it
    replan_steps = 5                # execute 5 actions of each returned chunk, then ask again (default: all)
    gripper = "libero"              # the server's gripper convention: libero | open-positive | open-one | close-one
    binarize_gripper = false        # send exactly -1 / +1
    normalized = false              # true: actions come in [-1, 1]; norm_stats (a dataset_statistics.json) and
                                    # unnorm_key say how to unnormalize them
    connect_timeout = 30.0          # seconds; call_timeout (per observation), retries, max_message_mb likewise

One connection per env slot (both protocols allow one request in flight per connection), all of a control step's
requests sent before any answer is awaited, so a batching server sees the engine's batch. A server that dies, times
out or answers garbage mid-episode makes that episode an error (vla_bench/policies/base.py SlotErrors): counted
apart from failures and retried by the next run. The identity recorded with results is the URL plus a digest of
the server's metadata (every row's `versions` holds the metadata itself); a server that reports nothing is warned
about, because its results cannot be told apart from another model's at the same URL.
"""
from __future__ import annotations

import hashlib
import json
import warnings
import numpy as np

from ..errors import VlaBenchError, choices
from ..serve.client import PROTOCOLS, CONNECTIONS, Connection, Reliability, RemoteError
from ..serve.mapping import GRIPPERS, MAPPING_KEYS, ActionMapping, ObservationMapping, observation_mapping
from .base import SlotErrors
from .capabilities import Capabilities
from .repeat import ActionRepeater, check_replan_steps

KEYS = {"url": str, "protocol": str, "observation": str, **MAPPING_KEYS, "gripper": str, "binarize_gripper": bool,
        "normalized": bool, "norm_stats": str, "unnorm_key": str, "replan_steps": int, "connect_timeout": float,
        "call_timeout": float, "retries": int, "max_message_mb": float}
REQUIRED = ("url", "protocol")
#: options that do not change what is executed (so they stay out of the identity)
_TRANSPORT = ("url", "protocol", "connect_timeout", "call_timeout", "retries", "max_message_mb")
#: metadata keys every server of a protocol reports whatever it serves: they identify no model
_GENERIC_METADATA = {"harness_version", "protocol_version", "capabilities", "timestamp"}


class RemoteIdentityWarning(UserWarning):
    """A server that reports no metadata: results at its URL cannot be told apart from another model's."""


def validate(spec, registry) -> None:
    o = spec.options
    if o["protocol"] not in PROTOCOLS:
        raise VlaBenchError(f"{spec.where('protocol')}unknown protocol {o['protocol']!r}; valid: {choices(PROTOCOLS)}")
    if not o["url"].startswith(("ws://", "wss://")):
        raise VlaBenchError(f"{spec.where('url')}expected a websocket URL (ws://HOST:PORT or wss://...), "
                            f"got {o['url']!r}")
    observation_mapping(o["protocol"], o, spec.where())
    if o.get("gripper", "libero") not in GRIPPERS:
        raise VlaBenchError(f"{spec.where('gripper')}unknown convention {o['gripper']!r}; valid: {choices(GRIPPERS)}")
    if o.get("normalized") and "norm_stats" not in o:
        raise VlaBenchError(f"{spec.where('norm_stats')}missing: normalized = true needs the statistics to "
                            "unnormalize with (a dataset_statistics.json)")
    check_replan_steps(o.get("replan_steps"), spec.where("replan_steps"))
    for key in ("connect_timeout", "call_timeout", "max_message_mb"):
        if key in o and not o[key] > 0:
            raise VlaBenchError(f"{spec.where(key)}must be > 0, got {o[key]!r}")
    if "retries" in o and o["retries"] < 1:
        raise VlaBenchError(f"{spec.where('retries')}must be >= 1 (connection attempts), got {o['retries']!r}")


def reliability(spec) -> Reliability:
    o, default = spec.options, Reliability()
    return Reliability(connect_timeout=o.get("connect_timeout", default.connect_timeout),
                       call_timeout=o.get("call_timeout", default.call_timeout),
                       retries=o.get("retries", default.retries),
                       max_bytes=int(o.get("max_message_mb", default.max_bytes / 2**20) * 2**20))


_metadata: dict[tuple[str, str], dict] = {}  # (url, protocol) -> the server's metadata, read once per process


def server_metadata(spec) -> dict:
    """The server's metadata (openpi: its first frame; vla-eval: its hello payload), read once per process."""
    key = (spec.options["url"], spec.options["protocol"])
    if key not in _metadata:
        conn = CONNECTIONS[key[1]](key[0], reliability(spec))
        try:
            metadata = conn.open()
        except RemoteError as e:
            raise VlaBenchError(f"{spec.where('url')}{e}") from None
        finally:
            conn.close()
        if not set(metadata) - _GENERIC_METADATA:
            warnings.warn(RemoteIdentityWarning(
                f"{spec.where('url')}the server reports no metadata identifying its model ({metadata!r}); results "
                "recorded under this entry cannot be told apart from another model served at the same URL"),
                stacklevel=2)
        _metadata[key] = metadata
    return _metadata[key]


def identity(spec, registry) -> str:
    o = spec.options
    digest = hashlib.sha256(json.dumps(server_metadata(spec), sort_keys=True, default=str).encode()).hexdigest()
    behaviour = {k: v for k, v in sorted(o.items()) if k not in _TRANSPORT}
    if "norm_stats" in o:  # the statistics' content, not their path
        behaviour["norm_stats"] = hashlib.sha256(spec.resolve_path(o["norm_stats"]).read_bytes()).hexdigest()[:16]
    tail = hashlib.sha256(json.dumps(behaviour, sort_keys=True).encode()).hexdigest()[:8]
    return f"remote:{o['protocol']}:{o['url']}:{digest[:16]}/{tail}"


def action_mapping(spec) -> ActionMapping:
    o = spec.options
    stats = None
    if o.get("normalized"):
        from ..openvla.normalization import action_stats

        path = spec.resolve_path(o["norm_stats"])
        try:
            stats = action_stats(json.loads(path.read_text()), o.get("unnorm_key"), spec.where("norm_stats"))
        except (OSError, ValueError) as e:
            raise VlaBenchError(f"{spec.where('norm_stats')}{path}: cannot read norm stats: {e}") from None
    return ActionMapping(gripper=o.get("gripper", "libero"), binarize_gripper=o.get("binarize_gripper", False),
                         stats=stats)


class ConnectionPool:
    """One connection per env slot to one server, opened on first use and after a failure (with back-off)."""

    def __init__(self, url: str, protocol: str, reliability: Reliability, metadata: dict | None = None):
        self.url, self.protocol, self.reliability = url, protocol, reliability
        self.metadata = metadata  # what the server reported when the run began: every reconnection must match
        self.connections: dict[int, Connection] = {}

    def get(self, slot: int) -> Connection:
        conn = self.connections.get(slot)
        if conn is None or not conn.is_open:
            conn = CONNECTIONS[self.protocol](self.url, self.reliability)
            conn.open()
            if self.metadata is not None and conn.metadata != self.metadata:
                # another model now answers at this URL: its actions must not be recorded under this identity
                conn.close()
                raise RemoteError(f"{conn.where()}expected the server that began this run (metadata "
                                  f"{_short(self.metadata)}), received metadata {_short(conn.metadata)}")
            self.connections[slot] = conn
        return conn

    def drop(self, slot: int) -> None:
        """Close a slot's connection after a failure: a late answer must never be read as the next one's."""
        conn = self.connections.pop(slot, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for slot in list(self.connections):
            self.drop(slot)


class RemotePolicy:

    def __init__(self, pool: ConnectionPool, mapping: ObservationMapping, actions: ActionMapping,
                 replan_steps: int | None = None, metadata: dict | None = None):
        self.pool = pool
        self.mapping = mapping
        self.actions = actions
        self.cameras = mapping.cameras()  # rendered by the env workers (the wrist camera only when sent)
        self.observation_transform = mapping  # the env workers flip and resize the frames they send
        self.repeater = ActionRepeater(1, replan_steps)  # the execution rule of chunks, shared with in-process
        self.capabilities = Capabilities(images=True, cameras=tuple(self.cameras), frame_transform=mapping,
                                         chunk_length=replan_steps or 1)  # None: the server's H, unknown until it answers
        self._starting: dict[int, int] = {}  # slot -> seed of an episode the server has not been told of yet
        self.row_versions = {"server": {"url": pool.url, "protocol": pool.protocol, "metadata": metadata or {}}}

    def reset(self, slot: int, seed: int) -> None:
        self.repeater.reset(slot)  # the rest of the chunk belongs to the episode that ended
        conn = self.pool.connections.get(slot)
        if conn is not None and conn.is_open and slot not in self._starting:
            try:
                conn.end_episode({})
            except RemoteError:
                self.pool.drop(slot)
        self._starting[slot] = seed

    def act(self, observations, instructions, slots) -> np.ndarray:
        slots = list(slots)
        errors: dict[int, str] = {}

        def query(rows: list[int]) -> list[np.ndarray]:
            for r in rows:  # every request goes out before any answer is awaited: the server can batch them
                slot = slots[r]
                try:
                    conn = self.pool.get(slot)
                    if slot in self._starting:
                        conn.start_episode({"seed": self._starting[slot], "task_description": instructions[r]})
                        del self._starting[slot]
                    conn.send_observation(self.mapping.wire_observation(observations[r], instructions[r]))
                except (RemoteError, ValueError) as e:
                    errors[slot] = str(e)
                    self.pool.drop(slot)
            chunks = []
            for r in rows:
                slot = slots[r]
                chunk = np.zeros((1, 7))  # a placeholder for a failed slot: its episode ends now, unexecuted
                if slot not in errors:
                    try:
                        chunk = self._chunk(self.pool.connections[slot].receive_actions())
                    except RemoteError as e:
                        errors[slot] = str(e)
                        self.pool.drop(slot)
                chunks.append(chunk)
            return chunks

        out = self.repeater.act(slots, query)
        if errors:
            for slot in errors:
                self.repeater.reset(slot)
            raise SlotErrors(errors, {s: out[k] for k, s in enumerate(slots) if s not in errors})
        return out

    def _chunk(self, actions: np.ndarray) -> np.ndarray:
        chunk = np.atleast_2d(actions)
        if chunk.shape[-1] != 7:
            raise RemoteError(f"{self.pool.url} ({self.pool.protocol} protocol): expected actions with 7 dims "
                              f"(LIBERO's OSC_POSE deltas + gripper), received shape {actions.shape}")
        return self.actions(chunk)

    def close(self) -> None:
        self.pool.close()


def build(spec, context) -> RemotePolicy:
    o = spec.options
    metadata = server_metadata(spec)
    pool = context.cache.get_or_create(("remote", o["url"], o["protocol"]),
                                       lambda: ConnectionPool(o["url"], o["protocol"], reliability(spec), metadata))
    return RemotePolicy(pool, observation_mapping(o["protocol"], o, spec.where()), action_mapping(spec),
                        o.get("replan_steps"), metadata)



def _short(metadata: dict) -> str:
    text = json.dumps(metadata, sort_keys=True, default=str)
    return text if len(text) <= 300 else text[:300] + "..."
