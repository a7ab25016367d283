"""Policies over the wire, both ways: the msgpack codec, the openpi and vla-eval protocols (client connections and a
batching server), and the observation mapping between LIBERO's observations and what those servers expect.

The remote checkpoint kind (vla_bench/policies/remote.py) is the client; `vla-bench serve` (server.py) the server.
"""
