"""Client connections to a policy server, one per env slot, in either protocol.

- openpi: the server sends a metadata map when a client connects; then each binary frame the client sends is an
  observation map and is answered by a map holding "actions" ((H, D) or (D,)). A text frame is the server's error
  report. The protocol has no episode messages: a server that keeps state across calls cannot be told of resets.
- vla-eval: every message is a map {type, payload, seq, timestamp}. The client opens with "hello" and the server
  answers "hello" with its description; "episode_start" / "episode_end" bracket an episode; an "observation" is
  answered by an "action" carrying the same seq, or by an "error".

Both allow one request in flight per connection, so the engine's batch reaches a batching server as one request
per slot, all sent before any answer is awaited. Every failure is a RemoteError naming the URL, the protocol and
what was expected against what was received; the caller decides what it costs (an episode, not the run).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from .codec import DEFAULT_MAX_BYTES, WireError, pack, unpack

PROTOCOLS = ("openpi", "vla-eval")


class RemoteError(RuntimeError):
    """A remote call that failed: the server is unreachable, closed the connection, timed out or answered
    something that is not the protocol."""


@dataclasses.dataclass(frozen=True)
class Reliability:
    connect_timeout: float = 30.0  # seconds for the TCP + websocket handshake and the metadata / hello answer
    call_timeout: float = 120.0  # seconds to wait for the answer to one observation (a 7B model's first call)
    retries: int = 3  # connection attempts before giving up, with back-off between them
    backoff: float = 0.5  # seconds before the 2nd attempt; doubles each time
    max_bytes: int = DEFAULT_MAX_BYTES  # the largest message sent or accepted


class Connection:
    """One websocket to a policy server; `open()` returns the server's metadata."""

    protocol = ""

    def __init__(self, url: str, reliability: Reliability = Reliability()):
        self.url = url
        self.reliability = reliability
        self.ws = None
        self.metadata: dict = {}

    def where(self) -> str:
        return f"{self.url} ({self.protocol} protocol): "

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def open(self) -> dict:
        """Connect, retrying with exponential back-off, and read the server's metadata."""
        from websockets.sync.client import connect

        r, delay, last = self.reliability, self.reliability.backoff, None
        for attempt in range(1, max(1, r.retries) + 1):
            try:
                # compression off: frames are already dense arrays, and deflate costs more CPU than the wire saves
                self.ws = connect(self.url, open_timeout=r.connect_timeout, close_timeout=2, compression=None,
                                  max_size=r.max_bytes, **_CONNECT_OPTIONS)
                self.metadata = self._handshake()
                return self.metadata
            except RemoteError:
                self.close()
                raise
            except Exception as e:  # refused, reset, DNS, handshake timeout: worth another attempt
                last = e
                self.close()
                if attempt < r.retries:
                    time.sleep(delay)
                    delay *= 2
        raise RemoteError(f"{self.where()}cannot connect after {r.retries} attempt(s): "
                          f"{type(last).__name__}: {last}")

    @property
    def is_open(self) -> bool:
        return self.ws is not None

    def close(self) -> None:
        ws, self.ws = self.ws, None
        if ws is not None:
            try:
                ws.close()
            except Exception:  # closing a broken socket: nothing more to learn
                pass

    # ---- messages -------------------------------------------------------------------------------------------
    def _send(self, value: Any, style: str) -> None:
        data = pack(value, style)
        if len(data) > self.reliability.max_bytes:
            raise RemoteError(f"{self.where()}observation message of {len(data)} bytes exceeds the limit of "
                              f"{self.reliability.max_bytes} bytes (max_message_mb)")
        try:
            self.ws.send(data)
        except Exception as e:
            raise RemoteError(f"{self.where()}send failed: {_describe(e)}") from None

    def _recv(self, timeout: float, expecting: str) -> Any:
        try:
            frame = self.ws.recv(timeout=timeout)
        except TimeoutError:
            raise RemoteError(f"{self.where()}expected {expecting} within {timeout:g} s, received nothing "
                              "(call_timeout)") from None
        except Exception as e:
            raise RemoteError(f"{self.where()}expected {expecting}, the connection ended: {_describe(e)}") from None
        if isinstance(frame, str) and self.protocol == "openpi":
            raise RemoteError(f"{self.where()}expected {expecting}, received the server's error report: "
                              f"{frame[:2000]}")
        try:
            return unpack(frame, self.reliability.max_bytes)
        except WireError as e:
            raise RemoteError(f"{self.where()}expected {expecting}: {e}") from None

    def start_episode(self, info: dict) -> None:
        """A new episode begins on this connection (vla-eval tells the server; openpi has no such message)."""

    def end_episode(self, info: dict) -> None:
        """The episode on this connection ended."""

    def send_observation(self, obs: dict) -> None:
        raise NotImplementedError

    def receive_actions(self) -> np.ndarray:
        """The answer to the last observation: (H, D) or (D,) float actions."""
        raise NotImplementedError

    def _actions(self, answer: Any, expecting: str) -> np.ndarray:
        if not isinstance(answer, dict) or "actions" not in answer:
            got = f"a map with keys {sorted(map(str, answer))}" if isinstance(answer, dict) else type(answer).__name__
            raise RemoteError(f"{self.where()}expected {expecting} (a map with 'actions'), received {got}")
        actions = answer["actions"]
        if isinstance(actions, list):
            try:
                actions = np.asarray(actions, dtype=np.float64)
            except (TypeError, ValueError):
                raise RemoteError(f"{self.where()}expected numeric 'actions', received a non-numeric list") from None
        if not isinstance(actions, np.ndarray) or actions.dtype.kind not in "iuf" or actions.ndim not in (1, 2) \
                or actions.size == 0:
            desc = (f"shape {actions.shape} dtype {actions.dtype}" if isinstance(actions, np.ndarray)
                    else type(actions).__name__)
            raise RemoteError(f"{self.where()}expected 'actions' of shape (H, D) or (D,) with numbers, received {desc}")
        if not np.all(np.isfinite(actions)):
            raise RemoteError(f"{self.where()}expected finite 'actions', received NaN or infinite values")
        return actions.astype(np.float64)


class OpenpiConnection(Connection):
    protocol = "openpi"

    def _handshake(self) -> dict:
        metadata = self._recv(self.reliability.connect_timeout, "the metadata map the server sends on connect")
        if not isinstance(metadata, dict):
            raise RemoteError(f"{self.where()}expected a metadata map on connect, received "
                              f"{type(metadata).__name__}")
        return metadata

    def send_observation(self, obs: dict) -> None:
        self._send(obs, "openpi")

    def receive_actions(self) -> np.ndarray:
        return self._actions(self._recv(self.reliability.call_timeout, "an action map"), "an action map")


class VlaEvalConnection(Connection):
    protocol = "vla-eval"

    def __init__(self, url: str, reliability: Reliability = Reliability()):
        super().__init__(url, reliability)
        self.seq = 0
        self.pending: int | None = None

    def _message(self, kind: str, payload: dict) -> int:
        self.seq += 1
        self._send({"type": kind, "payload": payload, "seq": self.seq, "timestamp": time.time()}, "vla-eval")
        return self.seq

    def _handshake(self) -> dict:
        self._message("hello", {"client": "vla-bench", "protocol_version": 1})
        reply = self._recv(self.reliability.connect_timeout, "a hello message")
        if not isinstance(reply, dict) or reply.get("type") != "hello" or not isinstance(reply.get("payload"), dict):
            got = reply.get("type") if isinstance(reply, dict) else type(reply).__name__
            raise RemoteError(f"{self.where()}expected a hello message, received {got!r}")
        return reply["payload"]

    def start_episode(self, info: dict) -> None:
        self._message("episode_start", info)

    def end_episode(self, info: dict) -> None:
        self._message("episode_end", info)

    def send_observation(self, obs: dict) -> None:
        self.pending = self._message("observation", obs)

    def receive_actions(self) -> np.ndarray:
        reply = self._recv(self.reliability.call_timeout, "an action message")
        if not isinstance(reply, dict) or not {"type", "payload", "seq"} <= set(reply):
            raise RemoteError(f"{self.where()}expected a message map with type, payload and seq, received "
                              f"{sorted(map(str, reply)) if isinstance(reply, dict) else type(reply).__name__}")
        if reply["type"] == "error":
            raise RemoteError(f"{self.where()}the server reported an error: {reply['payload']}")
        if reply["type"] != "action" or reply["seq"] != self.pending:
            raise RemoteError(f"{self.where()}expected an action message with seq {self.pending}, received "
                              f"{reply['type']!r} with seq {reply['seq']!r}")
        return self._actions(reply["payload"], "an action payload")


def _connect_options() -> dict:
    """Options of websockets' sync connect that only newer versions have: a plain connection (not the context
    manager or auto-reconnecting iterator that 16+ prefer: reconnection here is per slot and per episode) and no
    HTTP proxy from the environment (policy servers are reached directly)."""
    import inspect

    from websockets.sync.client import connect

    params = inspect.signature(connect).parameters
    return {**({"legacy": True} if "legacy" in params else {}), **({"proxy": None} if "proxy" in params else {})}


_CONNECT_OPTIONS = _connect_options()

CONNECTIONS = {"openpi": OpenpiConnection, "vla-eval": VlaEvalConnection}


def connect(url: str, protocol: str, reliability: Reliability = Reliability()) -> Connection:
    """An open connection (metadata read)."""
    conn = CONNECTIONS[protocol](url, reliability)
    conn.open()
    return conn


def _describe(e: Exception) -> str:
    """A closed connection's code and reason say more than its exception type (1009: message too big)."""
    rcvd = getattr(e, "rcvd", None) or getattr(e, "sent", None)
    if rcvd is not None:
        return f"connection closed with code {rcvd.code} {rcvd.reason!r}" + (
            " (a message exceeded a size limit: max_message_mb of the entry, --max-message-mb of vla-bench serve)"
            if rcvd.code == 1009 else "")
    return f"{type(e).__name__}: {e}"
