"""What the main process pays to receive simulator answers: an OpenVLA observation (a 256x256 camera frame, the
prepared 224x224 frame, proprioception) pickled whole through a pipe (the baseline, how answers travelled before
engine/arena.py) against its frames through the slot's shared-memory arena and copied out, measured in the same run.

    .venv/bin/python -m pytest benchmarks/bench_arena.py --benchmark-only --benchmark-group-by=group

Each round: WORKERS stand-in workers (processes answering at once with a fixed observation, no simulator) are each
sent one command and every answer is read, as the engine reads one lockstep group after a batch.
"""
import multiprocessing as mp
from multiprocessing.connection import wait as wait_for_connections

import numpy as np
import pytest

from vla_bench.engine.arena import Arena

WORKERS = 8


def observation() -> dict:
    rng = np.random.default_rng(0)
    return {"agentview_image": rng.integers(0, 255, (256, 256, 3), dtype=np.uint8),
            "vla_bench_prepared_frame": ("chain", rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)),
            "robot0_eef_pos": rng.normal(size=3), "robot0_eef_quat": rng.normal(size=4),
            "robot0_gripper_qpos": rng.normal(size=2), "object-state": rng.normal(size=60)}


def answer_forever(conn, arena_name):
    arena = Arena(arena_name) if arena_name else None
    obs = observation()
    while conn.recv() != "close":
        conn.send(arena.pack(obs) if arena else obs)
    if arena:
        arena.close()


@pytest.fixture(params=["pipe", "arena"])
def workers(request):
    ctx = mp.get_context("spawn")
    arenas = [Arena(create=True) if request.param == "arena" else None for _ in range(WORKERS)]
    conns, procs = [], []
    for arena in arenas:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=answer_forever, args=(child, arena.name if arena else None), daemon=True)
        proc.start()
        conns.append(parent)
        procs.append(proc)
    yield request.param, conns, arenas
    for conn, proc in zip(conns, procs):
        conn.send("close")
        proc.join(10)
    for arena in arenas:
        if arena:
            arena.close()


def test_receive_one_group(benchmark, workers):
    how, conns, arenas = workers
    slot_of = {conn: slot for slot, conn in enumerate(conns)}

    def one_group():
        for conn in conns:
            conn.send("go")
        pending, received = set(conns), []
        while pending:
            for conn in wait_for_connections(list(pending)):
                pending.discard(conn)
                obs = conn.recv()
                arena = arenas[slot_of[conn]]
                received.append(arena.unpack(obs) if arena else obs)
        return received

    benchmark.group = f"receive {WORKERS} OpenVLA observations"
    received = benchmark.pedantic(one_group, rounds=200, warmup_rounds=5, iterations=1)
    benchmark.extra_info["ms_per_answer"] = 1000 * benchmark.stats.stats.mean / WORKERS
    assert len(received) == WORKERS
    np.testing.assert_array_equal(received[0]["agentview_image"], observation()["agentview_image"])
