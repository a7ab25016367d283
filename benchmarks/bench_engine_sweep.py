"""Which (workers, groups) keeps a GPU model busiest: issue 18's engine swept in one process on the GPU host, each
configuration beside the kernel alone at its batch size, measured in the same run.

    . tools/gpu/setup_host.sh
    python3 benchmarks/bench_engine_sweep.py --out OUT --snapshot .bench/rand7b --configs 48x2 48x3 96x3

The model is loaded and its graphs prepared once; one pool of the largest worker count serves every configuration
(a configuration of W workers uses the first W). Per configuration: the episodes of `--tasks` (one wave: W episodes
spread over the tasks) start, the loop runs until every slot has acted once (the envs are built and reset: not
timed), then is timed to the end of the episodes (`--steps` per episode). Reported per configuration: loop
actions/s, the policy's busy share, the share spent waiting for simulators (engine.stats.wait_s), the kernel's
actions/s at the configuration's batch size and the ratio. A `sim` configuration (e.g. `96xsim`) acts instantly
(no model): the simulators' own ceiling on this host. The pytest path (`bench_closed_loop.py`) remains the figure
of record; this sweep chooses its settings.

Output: OUT/bench_engine_sweep.json, rewritten after each configuration.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def parse_config(text: str) -> tuple[int, int | str]:
    workers, _, groups = text.partition("x")
    return int(workers), ("sim" if groups == "sim" else int(groups))


class PoolView:
    """The first `n` slots of a WorkerPool, as the scheduler sees a pool."""

    def __init__(self, pool, n: int):
        self.pool, self.n = pool, n

    def keep(self, slot, key, obj):
        self.pool.keep(slot, key, obj)

    def submit(self, slot, command, spec, *args):
        self.pool.submit(slot, command, spec, *args)

    @property
    def busy(self):
        return self.pool.busy

    def wait(self, slots=None, timeout=None):
        return self.pool.wait(slots, timeout)


class InstantPolicy:
    """Acts at once with a still arm: what the simulators alone can do."""

    def __init__(self, capabilities):
        self.capabilities = capabilities

    def reset(self, slot, seed):
        pass

    def act(self, observations, instructions, slots):
        actions = np.zeros((len(slots), 7))
        actions[:, 6] = -1.0
        return actions


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all the host's cores, from /proc/stat (Linux): how full the cores were."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def memory_gib(pool) -> dict:
    """The host's available memory and the workers' resident sets (/proc, Linux)."""
    def kib(path, key):
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
        return 0
    rss = [kib(f"/proc/{proc.pid}/status", "VmRSS:") for proc, _ in pool.workers]
    return {"available_gib": round(kib("/proc/meminfo", "MemAvailable:") / 2**20, 1),
            "worker_rss_gib_mean": round(sum(rss) / len(rss) / 2**20, 2), "workers_rss_gib": round(sum(rss) / 2**20, 1)}


def run_config(pool, policy, protocol, tasks, workers: int, groups: int) -> dict:
    from vla_bench.engine.pool import EnvSpec
    from vla_bench.engine.scheduler import Job, Scheduler
    from vla_bench.policies.capabilities import capabilities_of

    capabilities = capabilities_of(policy)
    scheduler = Scheduler(PoolView(pool, workers), groups)
    per_task = -(-workers // len(tasks))
    for task in tasks:
        spec = EnvSpec(protocol, task.index, capabilities.cameras_to_render(False), capabilities.privileged)
        scheduler.add(Job(f"task{task.index + 1}", [policy], spec, task.language, range(per_task),
                          lambda i, t=task.index: protocol.episode_seed(t, i), lambda outcome: None))
    try:
        start = time.perf_counter()
        scheduler.run(until=lambda: scheduler.stats.actions >= min(workers, per_task * len(tasks)))
        warm_s = time.perf_counter() - start
        before = scheduler.stats.as_dict()
        timing_before = dataclasses.replace(scheduler.stats)
        cpu_before, own_before = cpu_ticks(), os.times()
        scheduler.run()
        cpu_after, own_after = cpu_ticks(), os.times()
        after = scheduler.stats.as_dict()
        memory = memory_gib(pool)
    finally:
        scheduler.close()
    wall = after["wall_s"] - before["wall_s"]
    batches = {k: v - before["batches"].get(k, 0) for k, v in after["batches"].items()}
    result = {"workers": workers, "groups": groups, "warm_s": warm_s, "wall_s": wall,
              "actions": after["actions"] - before["actions"],
              "policy_s": after["policy_s"] - before["policy_s"], "wait_s": after["wait_s"] - before["wait_s"],
              "batches": {k: v for k, v in batches.items() if v}}
    timing = dataclasses.replace(scheduler.stats)  # the timed part's simulator timings alone
    for name in ("steps_timed", "sim_s", "render_s", "transform_s", "spans", "span_s", "lag_s"):
        setattr(timing, name, getattr(timing, name) - getattr(timing_before, name))
    timing.policy_s, timing.batches = result["policy_s"], collections.Counter(batches)
    result["step_timing"] = timing.step_timing()
    result["host_cpu_busy"] = round((cpu_after[0] - cpu_before[0]) / max(1, cpu_after[1] - cpu_before[1]), 3)
    result["main_process_cores"] = round((own_after.user + own_after.system - own_before.user - own_before.system)
                                         / wall, 2)
    result["memory"] = memory
    result["actions_per_s"] = result["actions"] / wall
    result["busy"] = result["policy_s"] / wall
    result["sim_wait"] = result["wait_s"] / wall
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--snapshot", type=Path, default=REPO / ".bench" / "rand7b")
    p.add_argument("--suite", default="libero_spatial")
    p.add_argument("--tasks", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=60, help="steps per episode (default: %(default)s)")
    p.add_argument("--configs", nargs="+", default=["48x2", "48x3", "96x3"],
                   help="WORKERSxGROUPS, or WORKERSxsim for the simulators alone")
    p.add_argument("--kernel-rounds", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=560.0, help="configurations past this are skipped")
    p.add_argument("--tiny", action="store_true", help="a tiny random snapshot on the CPU (checks the flow)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    configs = [parse_config(c) for c in args.configs]
    record: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "configs": [], "kernel": {}}
    path = args.out / "bench_engine_sweep.json"

    def save():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, path)

    from bench_closed_loop import load_policy, time_kernel  # the pytest path's loader and kernel timer
    from vla_bench.engine.pool import WorkerPool
    from vla_bench.envs.tasks import suite_tasks
    from vla_bench.openvla.random_snapshot import write_random_snapshot
    from vla_bench.protocol import reference_protocol

    t = time.perf_counter()
    folder, reused = write_random_snapshot(args.snapshot, device="cpu" if args.tiny else "cuda", tiny=args.tiny)
    record["write_s"], record["reused"] = time.perf_counter() - t, reused
    print(f"[sweep] snapshot in {record['write_s']:.0f} s", flush=True)
    t = time.perf_counter()
    pool = WorkerPool(max(w for w, _ in configs))  # spawned while the model loads
    record["pool_start_s"] = time.perf_counter() - t
    record["arenas"] = pool.arenas[0] is not None  # frames through shared memory (engine/arena.py)
    args.snapshot = folder
    loader = argparse.Namespace(snapshot=folder, tiny=args.tiny, suite=args.suite)
    t = time.perf_counter()
    policy = load_policy(loader)
    record["load_s"] = time.perf_counter() - t
    record["device"] = str(policy.device)
    tasks = [suite_tasks(args.suite)[n - 1] for n in args.tasks]
    instructions = [task.language for task in tasks]
    batches = sorted({-(-w // g) for w, g in configs if g != "sim"})
    t = time.perf_counter()
    policy.prepare(max(batches), instructions)
    record["prepare_s"] = time.perf_counter() - t
    record["kernel"] = time_kernel(policy, instructions, batches, args.kernel_rounds, started + args.budget_s)
    save()
    protocol = reference_protocol(args.suite, max_steps=args.steps)
    try:
        for workers, groups in configs:
            if time.perf_counter() - started > args.budget_s:
                record["configs"].append({"workers": workers, "groups": groups, "skipped": "budget"})
                continue
            if groups == "sim":
                result = run_config(pool, InstantPolicy(policy.capabilities), protocol, tasks, workers, 1)
                result["groups"] = "sim"
            else:
                result = run_config(pool, policy, protocol, tasks, workers, groups)
                kernel = record["kernel"]["per_batch"].get(str(-(-workers // groups)))
                if kernel:
                    result["kernel_actions_per_s"] = kernel["actions_per_s"]
                    result["ratio"] = result["actions_per_s"] / kernel["actions_per_s"]
            record["configs"].append(result)
            save()
            print(f"[sweep] {workers}x{groups}: {result['actions_per_s']:.1f} actions/s, busy {result['busy']:.2f}, "
                  f"sim wait {result['sim_wait']:.2f}, ratio {result.get('ratio', float('nan')):.2f} "
                  f"(warm {result['warm_s']:.0f} s, batches {result['batches']}); host cpu {result['host_cpu_busy']}, "
                  f"main {result['main_process_cores']} cores; {result['step_timing']}; {result['memory']}", flush=True)
    finally:
        pool.close()
    record["total_s"] = time.perf_counter() - started
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
