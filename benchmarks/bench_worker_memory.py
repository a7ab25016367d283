"""What one simulator worker holds: a LIBERO env with one 256x256 camera, reset and stepped, preparing OpenVLA's
frames (openvla/frames.py, NumPy) against the same worker with torch imported for the frame transform, as the chain
was before it left torch (the baseline, measured in the same run).

    MUJOCO_GL=egl .venv/bin/python -m pytest benchmarks/bench_worker_memory.py --benchmark-only \
        --benchmark-group-by=group

The memory is in each result's extra_info: the workers' unique (private) and resident MiB, from /proc (Linux); the
timed part is starting the pool and one reset plus STEPS steps per worker. How many workers a host holds follows
from the unique figure (engine/sizing.py plans with it).
"""
from __future__ import annotations

import numpy as np
import pytest

from vla_bench.engine.pool import EnvSpec, WorkerPool
from vla_bench.openvla.frames import FrameChain
from vla_bench.protocol import reference_protocol

WORKERS = 2
STEPS = 5


class FrameChainWithTorch(FrameChain):
    """The chain as it ran when it computed with torch: torch imported in the worker, one op on each frame."""

    def __call__(self, observation: dict) -> dict:
        import torch

        torch.from_numpy(np.ascontiguousarray(observation[self.image_key])).float().sum()
        return super().__call__(observation)


def private_and_resident_mib(pid: int) -> tuple[float, float]:
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                fields[name] = int(rest.split()[0])
    return (fields["Private_Clean"] + fields["Private_Dirty"]) / 1024, fields["Rss"] / 1024


def run_workers(chain: FrameChain) -> dict:
    spec = EnvSpec(reference_protocol("libero_spatial"), 0, ("agentview",))
    with WorkerPool(WORKERS) as pool:
        for slot in range(WORKERS):
            pool.keep(slot, "chain", chain)
            pool.submit(slot, "reset", spec, "chain", slot, 0)
        for _ in range(STEPS + 1):
            answers = {}
            while len(answers) < WORKERS:
                answers.update(pool.wait())
            assert not [a.error for a in answers.values() if a.error]
            assert all(FrameChain.PREPARED in a.obs for a in answers.values())
            if _ < STEPS:
                for slot in range(WORKERS):
                    pool.submit(slot, "step", spec, "chain", np.zeros(7))
        memory = [private_and_resident_mib(proc.pid) for proc, _ in pool.workers]
    return {"worker_private_mib": round(float(np.mean([m[0] for m in memory]))),
            "worker_resident_mib": round(float(np.mean([m[1] for m in memory])))}


@pytest.mark.parametrize("chain", [FrameChain("agentview_image", flip=True, crop=True),
                                   FrameChainWithTorch("agentview_image", flip=True, crop=True)],
                         ids=["numpy-chain", "torch-in-worker-baseline"])
def test_worker_memory(benchmark, chain):
    benchmark.group = "simulator worker memory"
    result = benchmark.pedantic(run_workers, args=(chain,), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    print(type(chain).__name__, result)
