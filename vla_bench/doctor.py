"""`vla-bench doctor`: is this simulator stack the reference's? Settled scenes and rendered frames, compared.

Every (suite, task, init state) is reset as an evaluation episode resets it and its settled object poses are
compared with the fingerprints of the reference stack (envs/fingerprint.py); one agentview frame per suite is
compared with the stored reference frame. Every scene that differs is named with its task and init state, and the
command exits 1; a stack that matches exits 0. Work is spread over simulator processes, one task at a time each.
"""
from __future__ import annotations

import concurrent.futures
import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np

from .envs import fingerprint
from .errors import VlaBenchError
from .protocol import LIBERO_SUITES


def add_doctor_arguments(parser) -> None:
    parser.add_argument("--suite", nargs="+", default=list(LIBERO_SUITES), choices=LIBERO_SUITES, metavar="SUITE",
                        help=f"suites to check (default all: {', '.join(LIBERO_SUITES)})")
    parser.add_argument("--tasks", nargs="+", type=int, default=None, metavar="N",
                        help="task numbers, from 1 (default every task)")
    parser.add_argument("--init-states", type=int, default=None, metavar="K",
                        help="check K init states per task, spread evenly (default all of them)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="simulator processes")
    parser.add_argument("--no-render", action="store_true", help="skip the rendering check")
    parser.add_argument("--fingerprints", default=None, metavar="PATH",
                        help=f"reference fingerprint file (default: ${fingerprint.FINGERPRINTS_ENV} or the package's)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write every figure to this JSON file")
    parser.add_argument("--frames", default=None, metavar="DIR",
                        help="write each suite's rendered frame beside the reference (PNG) to look at")


def spread(n: int, k: int | None) -> list[int]:
    """k indices spread evenly over range(n), first and last included; all of them when k is None or >= n."""
    if k is None or k >= n:
        return list(range(n))
    if k < 1:
        raise VlaBenchError(f"--init-states must be at least 1, got {k}")
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, k)})


def _jobs(prints: fingerprint.Fingerprints, suites, tasks, k) -> list[tuple[str, int, list[int]]]:
    jobs = []
    for suite in suites:
        n_tasks = sum(1 for key in prints.arrays if key.startswith(f"{suite}/") and key.endswith("/positions"))
        if n_tasks == 0:
            raise VlaBenchError(f"{prints.path} has no fingerprints for {suite}")
        chosen = range(n_tasks) if tasks is None else [t - 1 for t in tasks]
        for task in chosen:
            if not 0 <= task < n_tasks:
                raise VlaBenchError(f"--tasks: {suite} has tasks 1 ... {n_tasks}, got {task + 1}")
            jobs.append((suite, task, spread(len(prints.arrays[f"{suite}/{task}/positions"]), k)))
    return jobs


def run_parallel(fn, jobs, workers: int):
    """(job, result or exception) as each finishes, from `workers` spawned simulator processes."""
    ctx = mp.get_context("spawn")  # no GL context or CUDA state copied into the simulators (engine/pool.py)
    with concurrent.futures.ProcessPoolExecutor(max(1, workers), mp_context=ctx) as pool:
        futures = {pool.submit(fn, *job): job for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            try:
                yield futures[future], future.result()
            except Exception as e:  # one task's failure is reported with its name; the others still run
                yield futures[future], e


def _short(error: Exception, limit: int = 300) -> str:
    """An exception in one line of at most `limit` characters (some simulator errors print whole matrices)."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    parts, start = [], None
    for k, i in enumerate(indices):
        if start is None:
            start = i
        if k + 1 == len(indices) or indices[k + 1] != i + 1:
            parts.append(f"{start}" if start == i else f"{start}-{i}")
            start = None
    return ", ".join(parts)


def check_scenes(prints, jobs, workers: int, report=print, settle=fingerprint.settle_task) -> dict:
    """Settle every job's scenes (settle(suite, task, inits) -> names, poses) and compare them with `prints`;
    reports each task whose scenes differ, naming its init states; returns {suite: {task: figures}}."""
    figures: dict = {}
    for (suite, task, inits), result in run_parallel(settle, jobs, workers):
        entry = figures.setdefault(suite, {})[f"task{task + 1}"] = {"checked": len(inits)}
        if isinstance(result, Exception):
            entry["error"] = _short(result)
            report(f"  {suite} task{task + 1}: ERROR {entry['error']}")
            continue
        names, poses = result
        checks = [prints.check(suite, task, i, names, poses[k]) for k, i in enumerate(inits)]
        bad = [i for i, c in zip(inits, checks) if not c.ok]
        worst = max(range(len(checks)), key=lambda k: (checks[k].worst_distance_m, checks[k].worst_angle_deg))
        entry.update(mismatched=bad, worst_distance_m=checks[worst].worst_distance_m,
                     worst_angle_deg=checks[worst].worst_angle_deg)
        if bad:
            report(f"  {suite} task{task + 1}: {len(bad)}/{len(inits)} init states differ ({_ranges(bad)}); "
                   f"e.g. init {bad[0]}: {checks[inits.index(bad[0])].detail}")
    return figures


def check_rendering(prints, suites, workers: int, report=print, frames_dir: str | None = None) -> dict:
    figures = {}
    jobs = [(suite,) for suite in suites if prints.frame(suite) is not None]
    for (suite,), result in run_parallel(fingerprint.render_reference, jobs, workers):
        if isinstance(result, Exception):
            figures[suite] = {"error": _short(result)}
            report(f"  render {suite}: ERROR {figures[suite]['error']}")
            continue
        frame, renderer = result
        diff = fingerprint.render_difference(prints.frame(suite), frame)
        if frames_dir:
            _save_frames(Path(frames_dir), suite, frame, prints.frame(suite))
        figures[suite] = {"mean_abs_diff": diff, "renderer": renderer, "ok": diff <= fingerprint.RENDER_TOLERANCE}
    return figures


def _save_frames(folder: Path, suite: str, frame: np.ndarray, reference: np.ndarray) -> None:
    """This stack's frame (downscaled like the reference) and the reference, side by side, upright."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    ours = np.round(fingerprint.downscale(frame)).astype(np.uint8)
    pair = np.concatenate([ours[::-1, ::-1], reference.astype(np.uint8)[::-1, ::-1]], axis=1)
    Image.fromarray(np.ascontiguousarray(pair)).resize((pair.shape[1] * 4, pair.shape[0] * 4), Image.NEAREST) \
        .save(folder / f"{suite}.png")


def run_doctor(args) -> int:
    path = Path(args.fingerprints) if args.fingerprints else fingerprint.fingerprints_path()
    if not path.is_file():
        raise VlaBenchError(f"{path}: no fingerprint file here (--fingerprints PATH)")
    prints = fingerprint.Fingerprints(path)
    jobs = _jobs(prints, args.suite, args.tasks, args.init_states)
    from .results import library_versions

    versions = library_versions()
    made = prints.meta["versions"]
    print(f"vla-bench doctor: this stack mujoco {versions.get('mujoco')}, robosuite {versions.get('robosuite')}; "
          f"reference mujoco {made.get('mujoco')}, robosuite {made.get('robosuite')}")
    print(f"settled scenes: {sum(len(j[2]) for j in jobs)} init states of {len(jobs)} tasks "
          f"(tolerance {fingerprint.POSITION_TOLERANCE_M * 1000:.0f} mm, {fingerprint.ANGLE_TOLERANCE_DEG:.0f} deg)")
    scenes = check_scenes(prints, jobs, args.workers)
    failed = False
    for suite, tasks in scenes.items():
        checked = sum(t["checked"] for t in tasks.values() if "error" not in t)
        bad = sum(len(t.get("mismatched", [])) for t in tasks.values())
        errors = [name for name, t in tasks.items() if "error" in t]
        worst = max(tasks.values(), key=lambda t: t.get("worst_distance_m", 0.0))
        failed |= bool(bad or errors)
        print(f"{suite}: {checked - bad}/{checked} scenes match"
              + (f", {len(errors)} tasks could not be checked" if errors else "")
              + f" (largest offset {worst.get('worst_distance_m', 0.0) * 100:.2f} cm)")
    renders = {} if args.no_render else check_rendering(prints, args.suite, args.workers, frames_dir=args.frames)
    for suite, r in renders.items():
        if "error" in r:
            failed = True
            continue
        failed |= not r["ok"]
        print(f"render {suite}: mean |difference| {r['mean_abs_diff']:.2f} levels "
              f"(tolerance {fingerprint.RENDER_TOLERANCE}) {'ok' if r['ok'] else 'DIFFERS'}; drawn by {r['renderer']}; "
              f"reference drawn by {prints.meta.get('renderer', 'unknown')}")
    if args.json:
        Path(args.json).write_text(json.dumps({"versions": versions, "reference": made, "scenes": scenes,
                                               "render": renders}, indent=1, sort_keys=True))
    print("doctor: " + ("this stack DIFFERS from the reference: scores from it are not comparable "
                        "(see the README's 'Validated simulator stacks')" if failed else "this stack matches the reference"))
    return 1 if failed else 0
