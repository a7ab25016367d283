"""`vla-bench serve`: one policy over the wire, in openpi's or vla-eval's protocol, batching concurrent clients.

Every observation from every connection goes into one queue; a batcher takes what is there (up to `max_batch`,
waiting at most `max_wait_s` for more once the first arrived) and runs one batched `policy.act` in a worker thread,
so the event loop keeps receiving while the model runs. An answer is the action chunk of the policy's execution
rule: one action, or for an `action_repeat = k` entry the k actions the rule executes (the client runs them all
before asking again, as the in-process engine does). openpi clients get the chunk as "actions" (H, 7); vla-eval
clients get one action per observation, the rest of the chunk buffered per connection and dropped at the next
episode_start, as vla-eval's own model servers do.

Metadata (openpi: the first frame; vla-eval: the hello payload) carries the checkpoint's name and content identity.
GET /health (and /healthz) answers 200 with the same facts. SIGINT / SIGTERM stop accepting connections, let the
batch in flight finish, close the connections with 1001 (going away) and return.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import json
import logging
import signal
import traceback
from http import HTTPStatus
from typing import Any, Callable

import numpy as np

from .codec import DEFAULT_MAX_BYTES, WireError, pack, unpack
from .mapping import ObservationMapping

log = logging.getLogger("vla_bench.serve")


@dataclasses.dataclass
class _Request:
    obs: dict
    instruction: str
    future: asyncio.Future


class PolicyServer:
    def __init__(self, policy, metadata: dict, protocol: str, mapping: ObservationMapping, max_batch: int = 8,
                 max_wait_s: float = 0.005, max_bytes: int = DEFAULT_MAX_BYTES):
        if protocol not in ("openpi", "vla-eval"):
            raise ValueError(f"unknown protocol {protocol!r}; valid: openpi, vla-eval")
        self.policy = policy
        self.protocol = protocol
        self.mapping = mapping
        self.max_batch = max(1, int(max_batch))
        self.max_wait_s = max(0.0, float(max_wait_s))
        self.max_bytes = max_bytes
        self.horizon = int(getattr(policy, "action_repeat", 1))
        self.metadata = {**metadata, "protocol": protocol, "action_horizon": self.horizon}
        self.batches: list[int] = []  # sizes of the batches run (tests and logs read them)
        self._queue: asyncio.Queue | None = None
        self._inflight = 0  # observations received and not yet answered
        # one thread: the model runs one batch at a time, and torch is not re-entrant on one module
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vla-serve")

    # ---- inference ----------------------------------------------------------------------------------------------
    def run_batch(self, observations: list[dict], instructions: list[str]) -> np.ndarray:
        """(B, H, 7) action chunks: fresh slots, then the policy's execution rule stepped H times (the model is
        asked once; the rule's repeats follow)."""
        slots = list(range(len(observations)))
        for slot in slots:
            self.policy.reset(slot, 0)
        steps = [np.asarray(self.policy.act(observations, instructions, slots), dtype=np.float64)
                 for _ in range(self.horizon)]
        return np.stack(steps, axis=1)

    async def _batcher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                remaining = deadline - loop.time()
                try:
                    batch.append(self._queue.get_nowait() if remaining <= 0 else
                                 await asyncio.wait_for(self._queue.get(), remaining))
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
            batch = [r for r in batch if not r.future.done()]  # a client that left while queued
            if not batch:
                continue
            self.batches.append(len(batch))
            try:
                chunks = await loop.run_in_executor(self._executor, self.run_batch, [r.obs for r in batch],
                                                    [r.instruction for r in batch])
                for r, chunk in zip(batch, chunks):
                    if not r.future.done():
                        r.future.set_result(chunk)
            except Exception as e:  # the model failed: every request of the batch gets the error, the server lives
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(e)

    async def infer(self, wire_obs: Any) -> np.ndarray:
        """A received observation -> its (H, 7) chunk, through the batcher."""
        if not isinstance(wire_obs, dict):
            raise WireError(f"expected an observation map, received {type(wire_obs).__name__}")
        try:
            obs, instruction = self.mapping.policy_observation(wire_obs)
        except ValueError as e:
            raise WireError(str(e)) from None
        future = asyncio.get_running_loop().create_future()
        self._inflight += 1
        try:
            await self._queue.put(_Request(obs, instruction, future))
            return await future
        finally:
            self._inflight -= 1

    # ---- protocols ----------------------------------------------------------------------------------------------
    async def _openpi(self, ws) -> None:
        await ws.send(pack(self.metadata, "openpi"))
        async for frame in ws:
            try:
                chunk = await self.infer(unpack(frame, self.max_bytes))
            except WireError as e:  # openpi's way: the error as a text frame, then the connection ends
                await ws.send(f"vla-bench serve ({self.protocol} protocol): {e}")
                await ws.close(1008, "bad observation (details in the previous frame)")
                return
            except Exception:
                await ws.send(traceback.format_exc())
                await ws.close(1011, "inference failed (traceback in the previous frame)")
                return
            await ws.send(pack({"actions": chunk}, "openpi"))

    async def _vla_eval(self, ws) -> None:
        buffered: collections.deque = collections.deque()

        async def reply(kind: str, payload: dict, seq) -> None:
            await ws.send(pack({"type": kind, "payload": payload, "seq": seq, "timestamp": _now()}, "vla-eval"))

        async for frame in ws:
            seq = None
            try:
                message = unpack(frame, self.max_bytes)
                if not isinstance(message, dict) or not {"type", "payload", "seq"} <= set(message):
                    got = sorted(map(str, message)) if isinstance(message, dict) else type(message).__name__
                    raise WireError(f"expected a message map with type, payload and seq, received {got}")
                kind, seq = message["type"], message["seq"]
                if kind == "hello":
                    await reply("hello", {"protocol_version": 1, "model_server": "vla-bench", "capabilities": {},
                                          **self.metadata}, seq)
                elif kind == "episode_start":
                    buffered.clear()
                elif kind == "episode_end":
                    buffered.clear()
                elif kind == "observation":
                    if not buffered:
                        buffered.extend(await self.infer(message["payload"]))
                    await reply("action", {"actions": buffered.popleft()}, seq)
                elif kind != "error":
                    raise WireError(f"unknown message type {kind!r}; valid: hello, episode_start, observation, "
                                    "episode_end")
            except Exception as e:  # vla-eval's way: an error message, and the connection stays open
                detail = str(e) if isinstance(e, WireError) else f"{type(e).__name__}: {e}"
                await reply("error", {"error": f"vla-bench serve ({self.protocol} protocol): {detail}"}, seq)

    async def _handle(self, ws) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            await (self._openpi(ws) if self.protocol == "openpi" else self._vla_eval(ws))
        except ConnectionClosed:
            pass  # the client left; its queued requests are skipped by the batcher

    def _health(self, connection, request):
        if request.path.split("?")[0] in ("/health", "/healthz"):
            body = json.dumps({"status": "ok", **self.metadata}, default=str) + "\n"
            response = connection.respond(HTTPStatus.OK, body)
            response.headers["Content-Type"] = "application/json"
            return response
        return None  # anything else proceeds to the websocket handshake

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    async def serve(self, host: str = "0.0.0.0", port: int = 8000, on_ready: Callable[[int], None] | None = None,
                    stop: asyncio.Event | None = None) -> None:
        """Serve until `stop` is set (or SIGINT / SIGTERM in the main thread); on_ready(port) once listening."""
        from websockets.asyncio.server import serve

        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
        except (RuntimeError, ValueError):  # not the main thread (tests run servers in threads)
            pass
        self._queue = asyncio.Queue()
        batcher = asyncio.create_task(self._batcher())
        # compression off (dense arrays gain nothing); pings off: a long first batch must not look like a dead peer
        async with serve(self._handle, host, port, process_request=self._health, max_size=self.max_bytes,
                         compression=None, ping_interval=None) as server:
            bound = server.sockets[0].getsockname()[1]
            log.info("serving %s on ws://%s:%d (%s protocol)", self.metadata.get("checkpoint", "?"), host, bound,
                     self.protocol)
            if on_ready:
                on_ready(bound)
            await stop.wait()
            server.server.close()  # the listening socket: no new connections; observations in flight are answered
            for _ in range(3000):  # at most ~30 s
                if not self._inflight:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)  # let the last answers leave
            server.close(close_connections=True)  # 1001 going away
            await server.wait_closed()
        batcher.cancel()
        self._executor.shutdown(wait=True)


def _now() -> float:
    import time

    return time.time()


class BackgroundServer:
    """A PolicyServer on its own event loop in a daemon thread (tests, benchmarks, notebooks): `url` once started,
    `close()` stops it gracefully."""

    def __init__(self, server: PolicyServer, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0):
        import threading

        self.server = server
        self.host = host
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.port = port

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(server.serve(host, port, on_ready=self._on_ready, stop=self._stop))
            except BaseException as e:  # reported to the starting thread
                self._error = e
                self._ready.set()

        self._thread = threading.Thread(target=run, name="vla-bench-serve", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise RuntimeError(f"policy server did not start: {self._error!r}")

    def _on_ready(self, port: int) -> None:
        self.port = port
        self._ready.set()

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def close(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
