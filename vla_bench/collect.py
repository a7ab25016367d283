"""`vla-bench collect`: scripted-expert demonstrations in LIBERO's HDF5 layout, in parallel, resumable.

One file per task, `OUT/<suite>/<task name>_demo.hdf5` (LIBERO's own file naming, so OpenVLA's rule that reads the
instruction from the file name gives the same text as the stored problem_info). Each demo holds what LIBERO's
`create_dataset.py` stores, recorded after the protocol's wait steps, one row per control step (the observation
*before* the step's action): actions, states (flattened MuJoCo state), robot_states, obs/agentview_rgb,
obs/eye_in_hand_rgb (as rendered, upside down; OpenVLA's conversion and our eval flip them), obs/ee_states
(pos + axis-angle), obs/gripper_states, obs/joint_states. Only successful episodes are kept, as in OpenVLA's
regeneration of the LIBERO data.

Episodes start from LIBERO's own random placement (`env.reset()` samples every object and fixture from its BDDL
region with the global NumPy RNG), seeded per demo, never from the 50 fixed evaluation init states: training on
those would leak the test set. Attempt j of task t uses seed `demo_seed(seed, t, j)`; the seed is stored in the
demo's attributes and the state right after the reset in its `init_state`, so a demo can be replayed.

Determinism and resume: attempts are dispatched in order and written in attempt order whatever worker finishes
first, failures are recorded in the file (data.attrs["vla_bench_failed_seeds"]), and a task stops at the first
prefix of attempts that holds `n_demos` successes. A killed run that is started again skips the seeds already in
the file and continues the same sequence, so it ends with the same demos as a run that was never killed.

Action noise (`--action-noise SIGMA`, off by default): the simulator executes the expert's action plus Gaussian
noise on the arm dimensions (a[0:6], clipped to [-1, 1]; the gripper is untouched), while `actions` records the
expert's own, clean action. The expert corrects the perturbation at the next step, so the demos show the way back
from the small off-path states that a cloned policy drifts into in closed loop, labelled with the expert's
correction (DART, Laskey et al. 2017). Without it every demo follows the expert's own path, and a policy that
imitates it well open loop can still fail closed loop from its first small error. The executed actions are stored
too (`executed_actions`; replaying `actions` does not reproduce `states` then), the noise is drawn from a generator
seeded by the demo's seed, and a file records its sigma: resuming with another sigma is refused. Measured with the
scripted expert on LIBERO-Spatial: sigma 0.3 cost 55 failed attempts for task6's 50 demos (none without noise) and
left task8 at 5 of 10 demos, so start lower.

Workers: one process per core, 'spawn' context (like envs/vector.py), each running a whole episode (env + expert)
and sending back the finished demo, so nothing crosses a pipe per step. The expert is built through the registry in
the calling process and pickled to the workers: the scripted expert is plain NumPy, and torch must stay out of the
workers (importing robosuite before torchvision segfaults in the reference stack).
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import time
import traceback
from multiprocessing.connection import wait
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from .data.libero_hdf5 import append_libero_demo, demo_keys, write_libero_demos
from .envs.libero import RANDOM_RESET_VERSION
from .envs.rendering import private_workdir
from .errors import VlaBenchError, choices
from .protocol import MAX_STEPS, Protocol, reference_protocol

#: LIBERO's camera names -> the obs keys robosuite renders them to and the HDF5 names LIBERO stores them under
CAMERAS = (("agentview", "agentview_image", "agentview_rgb"),
           ("robot0_eye_in_hand", "robot0_eye_in_hand_image", "eye_in_hand_rgb"))
DEFAULT_CAMERAS = tuple(name for name, _, _ in CAMERAS)
FAILED_ATTR = "vla_bench_failed_seeds"
RESET_ATTR = "vla_bench_random_reset_version"
NOISE_ATTR = "vla_bench_action_noise"
ARM_DIMS = 6  # a[0:6] moves the arm (translation + rotation deltas); a[6] is the gripper
DEFAULT_EXPERT = "expert"


def demo_seed(seed: int, task_index: int, attempt: int) -> int:
    """The seed of attempt `attempt` of task `task_index` (0-based): a hash of all three (SeedSequence), so the
    streams of different tasks and base seeds do not overlap, within np.random.seed's range."""
    return int(np.random.SeedSequence([seed, task_index, attempt]).generate_state(1, np.uint32)[0])


def task_file(out_dir: str | os.PathLike, suite: str, task_name: str) -> Path:
    return Path(out_dir) / suite / f"{task_name}_demo.hdf5"


# ---- summary ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TaskSummary:
    task_id: str
    language: str
    path: Path
    kept: int = 0  # demos in the file at the end (resumed + new)
    resumed: int = 0  # demos that were already in the file
    failed: int = 0  # failed attempts (in the file's record, resumed ones included)
    errors: int = 0  # attempts that raised or whose worker died (not recorded: a later run retries them)
    steps: list[int] = dataclasses.field(default_factory=list)  # steps of the demos written by this run
    first_error: str | None = None  # the traceback of the first error, to show the user

    @property
    def new(self) -> int:
        return self.kept - self.resumed


@dataclasses.dataclass
class CollectSummary:
    suite: str
    n_demos: int
    tasks: list[TaskSummary]
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        """Every task reached n_demos."""
        return all(t.kept >= self.n_demos for t in self.tasks)

    @property
    def kept(self) -> int:
        return sum(t.kept for t in self.tasks)

    @property
    def failed(self) -> int:
        return sum(t.failed for t in self.tasks)

    def as_dict(self) -> dict:
        return {"suite": self.suite, "n_demos": self.n_demos, "seconds": self.seconds, "complete": self.complete,
                "tasks": [{**dataclasses.asdict(t), "path": str(t.path)} for t in self.tasks]}


# ---- the worker side ----------------------------------------------------------------------------------------------
class DemoEnv:
    """A LiberoTaskEnv that starts episodes from LIBERO's random placement instead of a fixed init state."""

    def __init__(self, protocol: Protocol, task_index: int, cameras: Sequence[str], privileged: bool):
        from .envs.libero import LiberoTaskEnv

        self.base = LiberoTaskEnv(protocol, task_index, tuple(cameras), privileged)
        self.protocol = protocol

    def reset(self, seed: int) -> tuple[dict, np.ndarray]:
        """(observation after the wait steps, flattened sim state right after the reset)."""
        return self.base.reset_random(seed)

    def step(self, action) -> tuple[dict, bool]:
        return self.base.step(action)

    def sim_state(self) -> np.ndarray:
        return np.asarray(self.base.env.get_sim_state(), dtype=np.float64).copy()

    def close(self) -> None:
        self.base.close()


def perturb(action: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """The action the simulator executes under action noise: Gaussian noise on the arm dimensions, clipped to the
    action range; the gripper command as the expert gave it."""
    executed = np.array(action, dtype=np.float64)
    executed[:ARM_DIMS] = np.clip(executed[:ARM_DIMS] + rng.normal(0.0, sigma, ARM_DIMS), -1.0, 1.0)
    return executed


def record_episode(env: DemoEnv, policy, language: str, seed: int, max_steps: int, action_noise: float = 0.0
                   ) -> dict:
    """Run one expert episode from the random reset of `seed`; return {"success", "episode"} where episode is a
    `write_libero_demos` mapping. With `action_noise` > 0 the simulator executes perturbed actions (module
    docstring) and `actions` stays the expert's."""
    from robosuite.utils.transform_utils import quat2axisangle

    obs, init_state = env.reset(seed)
    policy.reset(0, seed)
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {k: [] for k in ("actions", "executed_actions", "states", "robot_states", "ee_states",
                                             "gripper_states", "joint_states")}
    images: dict[str, list] = {name: [] for _, key, name in CAMERAS if key in obs}
    success = False
    for _ in range(max_steps):
        rows["states"].append(env.sim_state())
        gripper = np.asarray(obs["robot0_gripper_qpos"], dtype=np.float64)
        pos = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        quat = np.array(obs["robot0_eef_quat"], dtype=np.float64)  # xyzw; quat2axisangle clips it in place
        rows["robot_states"].append(np.concatenate([gripper, pos, quat]))  # LIBERO's get_robot_state_vector
        rows["ee_states"].append(np.concatenate([pos, quat2axisangle(quat.copy())]))
        rows["gripper_states"].append(gripper)
        rows["joint_states"].append(np.asarray(obs["robot0_joint_pos"], dtype=np.float64))
        for _, key, name in CAMERAS:
            if name in images:
                images[name].append(np.asarray(obs[key], dtype=np.uint8))
        action = np.asarray(policy.act([obs], [language], [0])[0], dtype=np.float64)
        rows["actions"].append(action)
        executed = perturb(action, action_noise, rng) if action_noise > 0 else action
        rows["executed_actions"].append(executed)
        obs, done = env.step(executed)
        if done:
            success = True
            break
    stack = {k: np.stack(v) if v else np.zeros((0,)) for k, v in rows.items()}
    episode = {
        "actions": stack["actions"], "states": stack["states"], "robot_states": stack["robot_states"],
        "obs": {"ee_states": stack["ee_states"], "gripper_states": stack["gripper_states"],
                "joint_states": stack["joint_states"],
                **{name: np.stack(frames) for name, frames in images.items() if frames}},
        "init_state": init_state,
        "attrs": {"seed": int(seed), "action_noise": float(action_noise)},
    }
    if action_noise > 0:
        episode["executed_actions"] = stack["executed_actions"]
    return {"success": success, "episode": episode}


def _worker(conn, protocol: Protocol, cameras: tuple, policy, tasks: dict, action_noise: float = 0.0) -> None:
    """Serve ("run", task_index, attempt, seed) requests with finished episodes until ("close",)."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # the workers already fill the cores
    env, env_task = None, None
    workdir = private_workdir()  # MuJoCo's MUJOCO_LOG.TXT goes there, not into the user's folder
    try:
        while True:
            command, *args = conn.recv()
            if command == "close":
                break
            task_index, attempt, seed = args
            try:
                if env_task != task_index:  # a worker keeps its env while it stays on one task (building costs s)
                    if env is not None:
                        env.close()
                    env, env_task = None, None
                    env = DemoEnv(protocol, task_index, cameras, getattr(policy, "needs_privileged", False))
                    env_task = task_index
                result = record_episode(env, policy, tasks[task_index], seed, protocol.max_steps, action_noise)
                conn.send(("done", task_index, attempt, result))
            except Exception:
                conn.send(("error", task_index, attempt, traceback.format_exc(limit=6)))
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        if env is not None:
            env.close()
        conn.close()
        workdir.cleanup()


# ---- the calling side ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Task:
    index: int
    summary: TaskSummary
    done_seeds: set  # seeds already resolved in the file (kept or failed)
    next_attempt: int = 0  # the next attempt to dispatch
    next_write: int = 0  # the next attempt to write (results are written in attempt order)
    in_flight: set = dataclasses.field(default_factory=set)
    buffered: dict = dataclasses.field(default_factory=dict)  # attempt -> result waiting for earlier attempts
    stopped: bool = False  # reached max_attempts
    bar: int | None = None  # the rich progress task id


def _open_task_file(path: Path, task, suite: str, env_args: dict, action_noise: float = 0.0
                    ) -> tuple[int, set, set]:
    """Create the task's file, or read back (demo count, kept seeds, failed seeds) of an existing one."""
    if not path.exists():
        problem, domain = _bddl_names(task.bddl_path)
        write_libero_demos(path, [], task.language, problem_name=problem, domain_name=domain,
                           bddl_file_name=task.bddl_path, env_args=env_args)
        with h5py.File(path, "a") as f:
            f["data"].attrs[FAILED_ATTR] = "[]"
            f["data"].attrs[RESET_ATTR] = RANDOM_RESET_VERSION
            f["data"].attrs[NOISE_ATTR] = float(action_noise)
        return 0, set(), set()
    try:
        with h5py.File(path, "r") as f:
            data = f["data"]
            keys = demo_keys(data)
            version = int(data.attrs.get(RESET_ATTR, 1))
            noise = float(data.attrs.get(NOISE_ATTR, 0.0))
            kept = {int(data[k].attrs["seed"]) for k in keys if "seed" in data[k].attrs}
            failed = set(json.loads(data.attrs.get(FAILED_ATTR, "[]")))
            language = json.loads(data.attrs.get("problem_info", "{}")).get("language_instruction", "")
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise VlaBenchError(f"{path}: cannot resume from this file ({e}); it may have been cut off mid-write. "
                            "Move it away (its complete demos can be copied out with h5py) and run again") from e
    if language and language != task.language:
        raise VlaBenchError(f"{path} holds demos of {language!r}, not of {task.language!r}: choose another --out")
    if version != RANDOM_RESET_VERSION and (keys or failed):
        raise VlaBenchError(f"{path} was collected with random-reset version {version}, this vla-bench resets with "
                            f"version {RANDOM_RESET_VERSION} (see envs/libero.py: scenes differ), so its demos cannot "
                            "be continued: delete the file or choose another --out")
    if noise != action_noise and (keys or failed):
        raise VlaBenchError(f"{path} was collected with --action-noise {noise:g}, not {action_noise:g}: pass "
                            f"--action-noise {noise:g} to continue it, or choose another --out")
    return len(keys), kept, failed


def _bddl_names(bddl_path: str) -> tuple[str, str]:
    """(problem name, domain name) as LIBERO's problem_info stores them: '(problem LIBERO_Tabletop_Manipulation)'
    -> 'libero_tabletop_manipulation', '(:domain robosuite)' -> 'robosuite'."""
    import re

    text = Path(bddl_path).read_text()[:2000]
    problem = re.search(r"\(problem\s+([^\s)]+)", text)
    domain = re.search(r"\(:domain\s+([^\s)]+)", text)
    return (problem.group(1).lower() if problem else "", domain.group(1) if domain else "")


def _record_failure(path: Path, seed: int) -> None:
    with h5py.File(path, "a") as f:
        data = f["data"]
        failed = json.loads(data.attrs.get(FAILED_ATTR, "[]"))
        data.attrs[FAILED_ATTR] = json.dumps(failed + [int(seed)])


def collect(suite: str, tasks: Sequence[int], n_demos: int, out_dir: str | os.PathLike, workers: int | None = None,
            seed: int = 0, progress=None, *, expert: str = DEFAULT_EXPERT,
            checkpoints_file: str | os.PathLike | None = None, max_steps: int | None = None,
            camera_size: int = 256, cameras: Sequence[str] = DEFAULT_CAMERAS, max_attempts: int | None = None,
            policy=None, action_noise: float = 0.0) -> CollectSummary:
    """Collect `n_demos` successful expert demos for each task (LIBERO 0-based indices) of `suite` into
    `out_dir/<suite>/`.

    `progress`: a rich.progress.Progress to add one bar per task to (None: silent). `expert`: the checkpoints.toml
    entry that acts (the scripted expert by default); `policy` overrides it with a picklable Policy object.
    `cameras`: LIBERO camera names to record (default agentview and the wrist camera, as LIBERO stores them; ()
    records actions and states only, ~5x faster on a CPU, enough for norm stats or state-based experts).
    `max_attempts` per task (default 2 * n_demos + 10) bounds the work on a task the expert cannot do.
    `action_noise`: sigma of the noise added to the executed arm actions (module docstring; 0: none)."""
    from .envs.tasks import suite_tasks

    if suite not in MAX_STEPS:
        raise VlaBenchError(f"unknown suite {suite!r}; valid suites: {choices(MAX_STEPS)}")
    if n_demos < 1:
        raise VlaBenchError(f"--demos must be at least 1, got {n_demos}")
    if not 0.0 <= action_noise <= 1.0:
        raise VlaBenchError(f"--action-noise must be between 0 and 1 (the action range is [-1, 1]), got {action_noise}")
    if camera_size < 1:
        raise VlaBenchError(f"camera size must be at least 1, got {camera_size}")
    infos = suite_tasks(suite)
    if not tasks:
        raise VlaBenchError(f"no tasks given; valid tasks of {suite}: 1 ... {len(infos)}")
    for t in tasks:
        if not 0 <= t < len(infos):
            raise VlaBenchError(f"unknown task {t + 1} in {suite}; valid tasks: 1 ... {len(infos)}")
    max_attempts = 2 * n_demos + 10 if max_attempts is None else max_attempts
    protocol = dataclasses.replace(reference_protocol(suite, max_steps=max_steps), camera_size=camera_size)
    if policy is None:
        policy = _build_expert(suite, expert, checkpoints_file)
    known = [name for name, _, _ in CAMERAS]
    cameras = tuple(cameras)
    if any(c not in known for c in cameras):
        raise VlaBenchError(f"unknown camera(s) {choices(c for c in cameras if c not in known)}; "
                            f"valid: {choices(known)}")
    env_args = {"env_name": "ControlEnv", "collector": "vla-bench collect", "expert": expert,
                "seed": seed, "action_noise": action_noise, "protocol": protocol.as_dict(),
                "env_kwargs": {"camera_names": list(cameras), "camera_heights": camera_size,
                               "camera_widths": camera_size, "control_freq": 20}}

    started = time.monotonic()
    states: dict[int, _Task] = {}
    for t in dict.fromkeys(tasks):  # keep order, drop repeats
        info = infos[t]
        path = task_file(out_dir, suite, info.name)
        count, kept, failed = _open_task_file(path, info, suite, {**env_args, "bddl_file": info.bddl_path},
                                              action_noise)
        summary = TaskSummary(info.task_id, info.language, path, kept=count, resumed=count, failed=len(failed))
        states[t] = _Task(t, summary, kept | failed)
        if progress is not None:
            states[t].bar = progress.add_task(f"{suite} {info.task_id}", total=n_demos,
                                              completed=min(count, n_demos))

    def seed_of(task: _Task, attempt: int) -> int:
        return demo_seed(seed, task.index, attempt)

    def skip_resolved(task: _Task) -> None:
        while seed_of(task, task.next_attempt) in task.done_seeds:
            task.next_attempt += 1

    def needs_work(task: _Task) -> bool:
        if task.stopped:
            return False
        skip_resolved(task)
        pending_success = sum(1 for r in task.buffered.values() if r.get("success"))
        if task.summary.kept + pending_success + len(task.in_flight) >= n_demos:
            return False
        if task.next_attempt >= max_attempts:
            task.stopped = True
            return False
        return True

    def flush(task: _Task) -> None:
        """Write the buffered results whose earlier attempts are all resolved, in attempt order."""
        while True:
            s = seed_of(task, task.next_write)
            if s in task.done_seeds and task.next_write not in task.buffered:
                task.next_write += 1
                continue
            if task.next_write not in task.buffered:
                return
            result = task.buffered.pop(task.next_write)
            task.next_write += 1
            if "error" in result:
                task.summary.errors += 1
                task.summary.first_error = task.summary.first_error or result["error"]
            elif result["success"] and task.summary.kept < n_demos:
                append_libero_demo(task.summary.path, result["episode"])
                task.summary.kept += 1
                task.summary.steps.append(len(result["episode"]["actions"]))
            elif not result["success"]:
                _record_failure(task.summary.path, s)
                task.summary.failed += 1
            task.done_seeds.add(s)
            if progress is not None:
                progress.update(task.bar, completed=min(task.summary.kept, n_demos),
                                description=f"{suite} {task.summary.task_id} ({task.summary.failed} failed)")

    todo = [t for t in states.values() if needs_work(t)]
    n_workers = max(1, min(workers or os.cpu_count() or 1,
                           sum(n_demos - t.summary.kept for t in todo) or 1))
    if todo:
        _run_workers(states, n_workers, protocol, cameras, policy, infos, needs_work, seed_of, flush, action_noise)
    summary = CollectSummary(suite, n_demos, [t.summary for t in states.values()], time.monotonic() - started)
    return summary


def _run_workers(states: dict, n_workers: int, protocol: Protocol, cameras: tuple, policy, infos, needs_work,
                 seed_of, flush, action_noise: float = 0.0) -> None:
    ctx = mp.get_context("spawn")
    languages = {t: infos[t].language for t in states}
    workers: list = [None] * n_workers
    busy: dict[int, tuple[int, int]] = {}  # worker -> (task, attempt)
    last_task: dict[int, int] = {}

    def start(w: int) -> None:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, protocol, cameras, policy, languages, action_noise), daemon=True)
        proc.start()
        child.close()
        workers[w] = (proc, parent)

    def dispatch(w: int) -> bool:
        # stay on the worker's current task while it needs demos (an env rebuild costs seconds), else the first
        order = sorted(states.values(), key=lambda t: (t.index != last_task.get(w), list(states).index(t.index)))
        for task in order:
            if needs_work(task):
                attempt = task.next_attempt
                task.next_attempt += 1
                task.in_flight.add(attempt)
                workers[w][1].send(("run", task.index, attempt, seed_of(task, attempt)))
                busy[w] = (task.index, attempt)
                last_task[w] = task.index
                return True
        return False

    try:
        for w in range(n_workers):
            start(w)
            if not dispatch(w):
                break
        while busy:
            ready = wait([workers[w][1] for w in busy])
            for w in [w for w in list(busy) if workers[w][1] in ready]:
                task_index, attempt = busy.pop(w)
                task = states[task_index]
                try:
                    kind, _t, _a, payload = workers[w][1].recv()
                    result = payload if kind == "done" else {"success": False, "error": payload}
                except (EOFError, ConnectionResetError, OSError):  # the worker died (segfault, OOM kill)
                    proc, conn = workers[w]
                    conn.close()
                    proc.join(timeout=5)
                    result = {"success": False, "error": f"worker died (exit code {proc.exitcode})"}
                    start(w)
                    last_task.pop(w, None)
                task.in_flight.discard(attempt)
                task.buffered[attempt] = result
                flush(task)
                dispatch(w)
    finally:
        for proc, conn in (x for x in workers if x is not None):
            try:
                conn.send(("close",))
            except (BrokenPipeError, OSError):
                pass
        for proc, conn in (x for x in workers if x is not None):
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
            conn.close()


def _build_expert(suite: str, name: str, checkpoints_file):
    from .policies import BuildContext, ModelCache, build_policy
    from .registry import Registry

    registry = Registry.load(checkpoints_file)
    policy = build_policy(registry.get(name), BuildContext(registry, suite, ModelCache()))
    if getattr(policy, "needs_images", False):
        raise VlaBenchError(f"checkpoint {name!r} needs camera images to act; collect runs experts that read the "
                            "simulator state only (kind = \"scripted\")")
    return policy


# ---- CLI ----------------------------------------------------------------------------------------------------------
def add_collect_arguments(parser) -> None:
    parser.add_argument("--suite", default="libero_spatial", help=f"LIBERO suite ({choices(MAX_STEPS)})")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help="task numbers as in the test ids, 1-based: '1 2' or 'task1 task2' (default: all)")
    parser.add_argument("--demos", type=int, default=50, help="successful demos per task (default 50)")
    parser.add_argument("--out", default="demos", help="output folder; files go to OUT/SUITE/ (default demos)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: one per CPU core)")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the random resets (default 0)")
    parser.add_argument("--expert", default=DEFAULT_EXPERT, help="checkpoints.toml entry that acts (default expert)")
    parser.add_argument("--max-steps", type=int, default=None, help="steps per episode (default: the suite's)")
    parser.add_argument("--camera-size", type=int, default=256, help="image side in pixels (LIBERO stores 256)")
    parser.add_argument("--no-images", action="store_true",
                        help="record actions and states only (no cameras: ~5x faster on a CPU)")
    parser.add_argument("--max-attempts", type=int, default=None,
                        help="attempts per task before giving up (default 2 * demos + 10)")
    parser.add_argument("--action-noise", type=float, default=0.0, metavar="SIGMA",
                        help="execute the expert's arm actions plus N(0, SIGMA) noise and record its clean actions: "
                             "demos of recovering from drift, for closed-loop imitation (default 0: none)")


def run_collect(args) -> int:
    """The `vla-bench collect` command: 0 when every task got its demos, 1 otherwise."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn
    from rich.table import Table

    from .envs.tasks import parse_task_id, suite_tasks

    suite = args.suite
    if suite not in MAX_STEPS:
        raise VlaBenchError(f"unknown suite {suite!r}; valid suites: {choices(MAX_STEPS)}")
    tasks = ([parse_task_id(suite, str(t)) for t in args.tasks] if args.tasks
             else list(range(len(suite_tasks(suite)))))
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        summary = collect(suite, tasks, args.demos, args.out, args.workers, args.seed, progress,
                          expert=args.expert, checkpoints_file=getattr(args, "checkpoints_file", None),
                          max_steps=args.max_steps, camera_size=args.camera_size,
                          cameras=() if args.no_images else DEFAULT_CAMERAS, max_attempts=args.max_attempts,
                          action_noise=args.action_noise)
    table = Table(title=f"vla-bench collect: {suite}, {summary.seconds:.0f} s")
    for column in ("task", "demos", "new", "failed", "errors", "mean steps", "file"):
        table.add_column(column)
    for t in summary.tasks:
        table.add_row(t.task_id, f"{t.kept}/{summary.n_demos}", str(t.new), str(t.failed), str(t.errors),
                      f"{np.mean(t.steps):.0f}" if t.steps else "-", str(t.path))
    Console().print(table)
    for t in summary.tasks:
        if t.first_error:
            console.print(f"[red]{t.task_id}: {t.errors} attempt(s) raised; the first:[/red]\n{t.first_error}")
    if not summary.complete:
        short = [t.task_id for t in summary.tasks if t.kept < summary.n_demos]
        console.print(f"[yellow]{', '.join(short)}: fewer than {summary.n_demos} demos; run again with a higher "
                      "--max-attempts (the demos so far are kept)[/yellow]")
        return 1
    return 0
