"""Closed-loop throughput of OpenVLA-7B through the user path, against the kernel alone at the same batch sizes, in
one run (issue 18's targets). On the GPU host, after `. tools/gpu/setup_host.sh` (tools/gpu/bench_closed_loop.sh
does both):

    python3 benchmarks/bench_closed_loop.py --out bench_out --tasks 1 2 --episodes 16 --workers 16

Phases, each timed and printed as it ends, the JSON rewritten after each (nothing measured is lost to a kill):
  write   a full-size OpenVLA-7B snapshot with random weights and its checkpoints.toml entry
          (vla_bench/openvla/random_snapshot.py; a finished one of the same seed is reused)
  loop    the user path as a subprocess: `python -m pytest suites/SUITE --checkpoints-file F --checkpoint NAME
          --episodes E --vla-workers W -k "task1 or task2" --vla-engine-stats PATH`; the engine writes
          {"wall_s", "episodes", "actions", "policy_s", "gpu_busy", "batches": {"<size>": count}}; nvidia-smi's
          utilization is sampled beside it
  kernel  policy.infer alone (random uint8 frames already prepared, the selected tasks' instructions, after
          policy.prepare) at every batch size the loop ran, `--kernel-rounds` timed calls each
and a summary: loop actions/s, the kernel's actions/s on the loop's own mix of batch sizes (the time the kernel
alone needs for the loop's batches), their ratio (target >= 0.9), and the suite's 500-episode time extrapolated
from the loop's seconds per episode. With random weights every episode runs to the suite's max steps.

The host allows 10 minutes per command: `--budget-s` (default 570) bounds the run, the loop subprocess is stopped
when it would leave the kernel phase less than `--kernel-reserve-s`, and `--phases` runs a subset (e.g. `write` in one
command, `loop,kernel` in the next: the kernel phase then reads the loop's stats file from OUT). `--tiny` runs the
same flow on a tiny architecture (CPU, the tests).

Output: OUT/bench_closed_loop.json, OUT/loop.log (pytest's output), OUT/engine_stats.json (the engine's).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ("write", "loop", "kernel")
RESULT = "bench_closed_loop.json"
STATS = "engine_stats.json"


def say(text: str) -> None:
    print(text, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="closed-loop OpenVLA-7B throughput against the kernel alone")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="figures and logs (default: %(default)s)")
    p.add_argument("--snapshot", type=Path, default=REPO / ".bench" / "rand7b",
                   help="where the random snapshot is written; keep it out of --out (15 GB) (default: %(default)s)")
    p.add_argument("--name", default="rand7b", help="its checkpoints.toml entry (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a tiny architecture on the CPU (checks the flow, not speed)")
    p.add_argument("--suite", default="libero_spatial")
    p.add_argument("--tasks", type=int, nargs="+", default=[1, 2], help="task numbers (default: 1 2)")
    p.add_argument("--episodes", type=int, default=16, help="episodes per task (default: %(default)s)")
    p.add_argument("--workers", type=int, default=16, help="--vla-workers (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=None, help="--max-steps (default: the suite's)")
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of write,loop,kernel")
    p.add_argument("--budget-s", type=float, default=570.0, help="the whole run (default: %(default)s)")
    p.add_argument("--kernel-reserve-s", type=float, default=150.0,
                   help="time the loop phase leaves for the kernel phase (default: %(default)s)")
    p.add_argument("--kernel-rounds", type=int, default=5, help="timed calls per batch size (default: %(default)s)")
    p.add_argument("--kernel-batches", type=int, nargs="+", default=None,
                   help="batch sizes to time when no loop stats exist (default: the loop's)")
    p.add_argument("pytest_args", nargs="*", help="more pytest arguments for the loop phase (after --)")
    args = p.parse_args(argv)
    phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    bad = [x for x in phases if x not in PHASES]
    if bad or not phases:
        p.error(f"--phases: unknown {', '.join(bad) or '(empty)'}; valid: {', '.join(PHASES)}")
    args.phases = phases
    for name in ("episodes", "workers", "kernel_rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if any(t < 1 for t in args.tasks):
        p.error("--tasks: task numbers count from 1")
    if args.kernel_batches is not None and any(b < 1 for b in args.kernel_batches):
        p.error("--kernel-batches must be positive")
    return args


# ---- the run's record -----------------------------------------------------------------------------------------------
class Record:
    """The JSON under OUT, rewritten atomically after each phase. A run with a subset of --phases keeps what an
    earlier run wrote for the others (each phase's entry says when it ran)."""

    def __init__(self, out: Path):
        self.path = out / RESULT
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def put(self, key: str, value) -> None:
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.path)


def host_info() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                        timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


# ---- phase: write -----------------------------------------------------------------------------------------------------
def checkpoints_file(args) -> Path:
    return args.snapshot.parent / "checkpoints.toml"


def phase_write(args) -> dict:
    from vla_bench.openvla.random_snapshot import write_checkpoints_entry, write_random_snapshot

    folder, reused = write_random_snapshot(args.snapshot, device="cpu" if args.tiny else "cuda", seed=args.seed,
                                           tiny=args.tiny)
    toml = write_checkpoints_entry(checkpoints_file(args), args.name, folder)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return {"snapshot": str(folder), "checkpoints_file": str(toml), "reused": reused, "gib": size / 2**30}


# ---- phase: loop ------------------------------------------------------------------------------------------------------
def task_expression(tasks) -> str:
    """pytest -k for these task numbers (vla-bench reads task words exactly: task1 never selects task10)."""
    return " or ".join(f"task{t}" for t in tasks)


def loop_command(args, stats_path: Path, results_path: Path, engine_stats: bool = True) -> list[str]:
    """The user's command line; `--vla-engine-stats` is the engine's (issue 18) and the only option this benchmark
    adds to what a user types."""
    cmd = [sys.executable, "-m", "pytest", f"suites/{args.suite}", "--checkpoints-file", str(checkpoints_file(args)),
           "--checkpoint", args.name, "--episodes", str(args.episodes), "--vla-workers", str(args.workers),
           "-k", task_expression(args.tasks), "--vla-results", str(results_path), "-q"]
    if args.max_steps is not None:
        cmd += ["--max-steps", str(args.max_steps)]
    if engine_stats:
        cmd += ["--vla-engine-stats", str(stats_path)]
    return cmd + list(args.pytest_args)


class GpuSampler:
    """nvidia-smi's utilization.gpu once a second in a thread (nothing when nvidia-smi is absent): the GPU's own
    busy figure beside the engine's policy_s / wall_s."""

    def __init__(self):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-i", os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]],
                                     capture_output=True, text=True, timeout=5).stdout.split()
                self.samples.append(float(out[0]))
            except (OSError, subprocess.SubprocessError, ValueError, IndexError):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)

    def summary(self) -> dict:
        s = self.samples
        return {"samples": len(s), "mean_pct": statistics.fmean(s) if s else None,
                "median_pct": statistics.median(s) if s else None}


def run_bounded(cmd: list[str], log: Path, timeout_s: float) -> tuple[int | None, float]:
    """Run cmd in its own process group with output to `log`; past timeout_s, end that group (SIGTERM, then
    SIGKILL). Returns (exit code or None when stopped, seconds)."""
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=max(timeout_s, 1.0)), time.perf_counter() - start
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            return None, time.perf_counter() - start


def phase_loop(args, timeout_s: float) -> dict:
    stats_path, results_path, log = args.out / STATS, args.out / "loop.sqlite", args.out / "loop.log"
    for stale in (stats_path, results_path):  # a store from an earlier run would be resumed, not measured
        stale.unlink(missing_ok=True)
    cmd = loop_command(args, stats_path, results_path)
    say(f"[loop] {' '.join(cmd[1:])}  (stopped after {timeout_s:.0f} s)")
    with GpuSampler() as gpu:
        rc, seconds = run_bounded(cmd, log, timeout_s)
    tail = log.read_text(errors="replace").splitlines()[-15:]
    result = {"command": cmd[1:], "exit_code": rc, "timed_out": rc is None, "seconds": seconds,
              "nvidia_smi_utilization": gpu.summary(), "log_tail": tail}
    if stats_path.is_file():
        result["engine"] = json.loads(stats_path.read_text())
    else:
        result["error"] = (f"pytest wrote no {stats_path.name}: see {log} (does this vla-bench have "
                           "--vla-engine-stats?)")
    return result


# ---- phase: kernel ----------------------------------------------------------------------------------------------------
def load_policy(args):
    from vla_bench.openvla.checkpoint import load_snapshot
    from vla_bench.openvla.lora import BaseModel
    from vla_bench.openvla.policy import OpenVLAPolicy

    snapshot = load_snapshot(args.snapshot, device="cpu" if args.tiny else "auto")
    return OpenVLAPolicy(BaseModel(snapshot), args.suite)


def time_kernel(policy, instructions: list[str], batches: list[int], rounds: int, deadline: float) -> dict:
    """policy.infer alone per batch size: random uint8 frames already prepared (as env workers hand them over), the
    instructions cycled over the rows; one untimed call, then `rounds` timed ones (median). Sizes are timed in the
    given order until `deadline` (time.perf_counter()); the rest are reported as not timed."""
    import numpy as np

    from vla_bench.openvla.fast_generator import batch_bucket
    from vla_bench.openvla.frames import FrameChain

    rng = np.random.default_rng(0)
    size = policy.base.model.arch.image_size
    generator = policy.base.generator
    captures_before = generator.captures
    per_batch, skipped = {}, []
    for b in batches:
        if time.perf_counter() > deadline:
            skipped.append(b)
            continue
        obs = [{FrameChain.PREPARED: (policy.observation_transform,
                                      rng.integers(0, 256, (size, size, 3), dtype=np.uint8))} for _ in range(b)]
        texts = [instructions[i % len(instructions)] for i in range(b)]
        policy.infer(obs, texts)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            policy.infer(obs, texts)  # returns host numpy: the device work has finished
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        per_batch[str(b)] = {"ms_per_call": 1000 * seconds, "actions_per_s": b / seconds, "rows": batch_bucket(b),
                             "ms_min": 1000 * min(times), "ms_max": 1000 * max(times)}
        say(f"[kernel] B={b}: {1000 * seconds:.1f} ms per call, {b / seconds:.1f} actions/s")
    return {"per_batch": per_batch, "not_timed": skipped, "captures_while_timing": generator.captures - captures_before}


def phase_kernel(args, batches: list[int], deadline: float) -> dict:
    from vla_bench.envs.tasks import suite_tasks

    start = time.perf_counter()
    policy = load_policy(args)
    load_s = time.perf_counter() - start
    tasks = suite_tasks(args.suite)
    instructions = [tasks[t - 1].language for t in args.tasks]
    start = time.perf_counter()
    built = policy.prepare(max(batches), instructions)
    prepare_s = time.perf_counter() - start
    say(f"[kernel] model loaded in {load_s:.1f} s; prepare({max(batches)}) built {built} graphs in {prepare_s:.1f} s")
    result = time_kernel(policy, instructions, batches, args.kernel_rounds, deadline)
    result.update({"load_s": load_s, "prepare_s": prepare_s, "prepared_graphs": built,
                   "device": str(policy.device)})
    return result


def loop_batches(engine: dict | None) -> dict[int, int]:
    """{batch size: calls} from the engine's stats."""
    return {int(k): int(v) for k, v in ((engine or {}).get("batches") or {}).items() if int(v) > 0}


def kernel_order(counts: dict[int, int], fallback: list[int]) -> list[int]:
    """Batch sizes to time, the ones carrying most of the loop's actions first (so a time box drops the least)."""
    if counts:
        return sorted(counts, key=lambda b: -b * counts[b])
    return sorted(set(fallback), reverse=True)


# ---- summary ----------------------------------------------------------------------------------------------------------
def summarize(engine: dict, kernel: dict, suite_episodes: int, max_steps: int) -> dict:
    """The loop against the kernel on the loop's own mix of batch sizes: the kernel's actions/s there is
    sum(calls * size) / sum(calls * seconds per call) over the sizes timed (`kernel_covers`: the share of the
    loop's actions those sizes carried). Times for the whole suite are extrapolated from the loop's seconds per
    episode (all to max steps), and for a policy succeeding 85% of the time in about 110 steps, at the same
    actions/s."""
    counts = loop_batches(engine)
    timed = {int(b): v for b, v in (kernel.get("per_batch") or {}).items()}
    out: dict = {}
    wall, actions, episodes = engine.get("wall_s"), engine.get("actions"), engine.get("episodes")
    if wall and actions:
        out["loop_actions_per_s"] = actions / wall
    if engine.get("policy_s") and actions:
        out["loop_actions_per_policy_s"] = actions / engine["policy_s"]
    out["gpu_busy"] = engine.get("gpu_busy")
    loop_rows = sum(b * n for b, n in counts.items())
    covered = {b: n for b, n in counts.items() if b in timed}
    if covered:
        rows = sum(b * n for b, n in covered.items())
        seconds = sum(n * timed[b]["ms_per_call"] / 1000 for b, n in covered.items())
        out["kernel_actions_per_s_on_loop_mix"] = rows / seconds
        out["kernel_covers"] = rows / loop_rows
        main = max(counts, key=lambda b: b * counts[b])
        out["main_batch"] = main
        if main in timed:
            out["kernel_actions_per_s_at_main_batch"] = timed[main]["actions_per_s"]
        if "loop_actions_per_s" in out:
            out["ratio"] = out["loop_actions_per_s"] / out["kernel_actions_per_s_on_loop_mix"]
    if wall and episodes:
        out["extrapolated_suite_min"] = suite_episodes * wall / episodes / 60
        out["extrapolated_from_episodes"] = episodes
    if "loop_actions_per_s" in out:
        per_episode = 0.85 * 110 + 0.15 * max_steps
        out["suite_min_at_85pct_in_110_steps"] = suite_episodes * per_episode / out["loop_actions_per_s"] / 60
    return out


def print_summary(s: dict) -> None:
    def fmt(key, unit="", digits=1):
        v = s.get(key)
        return "n/a" if v is None else f"{v:.{digits}f}{unit}"

    say("\n[summary] loop {} actions/s (policy time: {}); kernel on the loop's mix {} actions/s (covers {}); ratio {}"
        .format(fmt("loop_actions_per_s"), fmt("loop_actions_per_policy_s"),
                fmt("kernel_actions_per_s_on_loop_mix"), fmt("kernel_covers", digits=2), fmt("ratio", digits=2)))
    say("[summary] GPU busy (engine) {}; suite extrapolated {} min (all to max steps), {} min at 85% success in "
        "~110 steps".format(fmt("gpu_busy", digits=2), fmt("extrapolated_suite_min"),
                            fmt("suite_min_at_85pct_in_110_steps")))


# ---- main -------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    deadline = start + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    record = Record(args.out)
    record.put("host", host_info())
    record.put("args", {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
    phase_s = dict(record.data.get("phase_s") or {})

    def done(phase: str, t0: float) -> None:
        phase_s[phase] = time.perf_counter() - t0
        record.put("phase_s", phase_s)
        say(f"[phase] {phase}: {phase_s[phase]:.1f} s (run so far {time.perf_counter() - start:.1f} s)")

    if "write" in args.phases:
        t0 = time.perf_counter()
        record.put("write", phase_write(args))
        done("write", t0)
    if "loop" in args.phases:
        t0 = time.perf_counter()
        reserve = args.kernel_reserve_s if "kernel" in args.phases else 0.0
        loop = phase_loop(args, deadline - time.perf_counter() - reserve)
        record.put("loop", loop)
        done("loop", t0)
        if "error" in loop:
            say(f"[loop] {loop['error']}")
    engine = (record.data.get("loop") or {}).get("engine")
    if engine is None and (args.out / STATS).is_file():
        engine = json.loads((args.out / STATS).read_text())
    if "kernel" in args.phases:
        t0 = time.perf_counter()
        batches = kernel_order(loop_batches(engine), args.kernel_batches or [args.workers])
        record.put("kernel", phase_kernel(args, batches, deadline - 5.0))
        done("kernel", t0)
    if engine and record.data.get("kernel"):
        from vla_bench.envs.tasks import suite_tasks
        from vla_bench.protocol import reference_protocol

        protocol = reference_protocol(args.suite, max_steps=args.max_steps)  # the suite's 50 episodes per task
        summary = summarize(engine, record.data["kernel"], protocol.episodes * len(suite_tasks(args.suite)),
                            protocol.max_steps)
        record.put("summary", summary)
        print_summary(summary)
    say(f"[done] {time.perf_counter() - start:.1f} s; figures in {record.path}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # run as a script from anywhere: this checkout's vla_bench first
    sys.exit(main())
