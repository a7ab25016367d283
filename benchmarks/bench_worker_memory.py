"""What one simulator worker holds: a LIBERO env with one 256x256 camera, reset and stepped, preparing OpenVLA's
frames. Measured in the same run, each row without one more of the changes that made workers smaller:
  now                    frames in NumPy (openvla/frames.py), the scene loaded from its compiled file
                         (envs/compiled_scenes.py; the cache is filled before the timed part), the model's texture
                         data given back once the renderer has it (envs/texture_memory.py)
  keeping-textures       the same with the textures kept (VLA_BENCH_KEEP_TEXTURES=1)
  compiling-scenes       and every worker compiling the scene XML (VLA_BENCH_SCENE_CACHE=off)
  compiling-and-torch    and torch imported for the frame transform: the worker before all three

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
from vla_bench.envs import compiled_scenes, texture_memory
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


NUMPY_CHAIN = FrameChain("agentview_image", flip=True, crop=True)


@pytest.mark.parametrize("chain,scene_cache,release_textures", [
    (NUMPY_CHAIN, True, True),
    (NUMPY_CHAIN, True, False),
    (NUMPY_CHAIN, False, False),
    (FrameChainWithTorch("agentview_image", flip=True, crop=True), False, False),
], ids=["now", "keeping-textures", "compiling-scenes", "compiling-and-torch"])
def test_worker_memory(benchmark, chain, scene_cache, release_textures, tmp_path, monkeypatch):
    benchmark.group = "simulator worker memory"
    # the workers inherit the environment
    monkeypatch.setenv(compiled_scenes.ENV_VAR, str(tmp_path / "scenes") if scene_cache else "off")
    monkeypatch.setenv(texture_memory.ENV_VAR, "0" if release_textures else "1")
    if scene_cache:
        run_workers(chain)  # fills the cache: the timed run measures workers that load the compiled scene
    result = benchmark.pedantic(run_workers, args=(chain,), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    print(type(chain).__name__, result)
