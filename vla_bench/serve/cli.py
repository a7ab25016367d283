"""`vla-bench serve NAME`: a checkpoints.toml entry as a policy server (vla_bench/serve/server.py)."""
from __future__ import annotations

import asyncio
import logging
from importlib import metadata as _dist

from ..errors import VlaBenchError, choices
from .client import PROTOCOLS
from .codec import DEFAULT_MAX_BYTES
from .mapping import DEFAULT_PRESET, PRESETS, observation_mapping
from .server import PolicyServer


def add_serve_arguments(p) -> None:
    p.add_argument("name", help="the checkpoints.toml entry to serve (an openvla base, a LoRA over one, ...)")
    p.add_argument("--protocol", default="openpi", help=f"wire protocol: {', '.join(PROTOCOLS)} (default openpi)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default all interfaces)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--suite", default="libero_spatial",
                   help="the suite whose conventions the policy follows: image key and flip, gripper, unnorm key")
    p.add_argument("--observation", default=None,
                   help=f"what clients send: {', '.join(PRESETS)} (default: the protocol's preset)")
    p.add_argument("--max-batch", type=int, default=8, help="most observations per model call (default 8)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a batch waits for more observations once one arrived (default 5 ms)")
    p.add_argument("--max-message-mb", type=float, default=DEFAULT_MAX_BYTES / 2**20,
                   help="largest message accepted (default 64)")


def build_server(registry, name: str, protocol: str = "openpi", suite: str = "libero_spatial",
                 observation: str | None = None, max_batch: int = 8, max_wait_ms: float = 5.0,
                 max_message_mb: float = DEFAULT_MAX_BYTES / 2**20, cache=None) -> PolicyServer:
    """The server of one entry: the policy built as in-process evaluation builds it (same model cache and fast
    path), metadata naming the entry and its content identity."""
    from ..policies import BuildContext, ModelCache, build_policy

    if protocol not in PROTOCOLS:
        raise VlaBenchError(f"--protocol: unknown protocol {protocol!r}; valid: {choices(PROTOCOLS)}")
    if max_batch < 1 or max_wait_ms < 0 or max_message_mb <= 0:
        raise VlaBenchError("--max-batch must be >= 1, --max-wait-ms >= 0 and --max-message-mb > 0")
    preset = observation or DEFAULT_PRESET[protocol]
    if preset not in PRESETS:
        raise VlaBenchError(f"--observation: unknown preset {preset!r}; valid: {choices(PRESETS)}")
    mapping = observation_mapping(protocol, {"observation": preset})
    spec = registry.get(name)
    policy = build_policy(spec, BuildContext(registry, suite, cache or ModelCache()))
    try:
        version = _dist.version("vla-bench")
    except _dist.PackageNotFoundError:
        version = "unknown"
    metadata = {"server": "vla-bench", "vla_bench_version": version, "checkpoint": name, "kind": spec.kind,
                "identity": registry.identity(spec), "suite": suite, "observation": preset,
                "action_convention": "libero (-1 open, +1 close), unnormalized"}
    return PolicyServer(policy, metadata, protocol, mapping, max_batch, max_wait_ms / 1000.0,
                        int(max_message_mb * 2**20))


def run_serve(args, registry) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    server = build_server(registry, args.name, args.protocol, args.suite, args.observation, args.max_batch,
                          args.max_wait_ms, args.max_message_mb)

    def ready(port: int) -> None:
        print(f"vla-bench serve: {args.name} ({server.metadata['identity']}) on ws://{args.host}:{port} "
              f"({args.protocol} protocol, max batch {server.max_batch}, max wait {args.max_wait_ms:g} ms); "
              f"health: http://{args.host}:{port}/health", flush=True)

    try:
        asyncio.run(server.serve(args.host, args.port, on_ready=ready))
    except OSError as e:  # the port is taken, the address is not this host's
        raise VlaBenchError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    print("vla-bench serve: stopped", flush=True)
    return 0
