"""The state of one evaluation session: registry, results store, policy cache and the results so far.

Both front ends build it with `session_from_options` from the same options (vla_bench/options.py): the pytest
plugin keeps one per pytest session, `vla-bench run` one per command. Policies are built once per (checkpoint, suite)
and their heavy parts (models) are shared through one ModelCache.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Callable

from .baselines import BaselineRun, load_baseline, save_baseline, task_pairs
from .envs.tasks import suite_tasks
from .errors import VlaBenchError
from .evaluate import EvalSettings, TaskResult, TaskRun, default_workers
from .gate import GateSettings, check_protocol_matches, gate_task, run_from_records, stop_rule
from .metrics.verdicts import compare_suite
from .options import OptionValues, parse_devices
from .policies import BuildContext, ModelCache, Policy, build_policy
from .protocol import Protocol, reference_protocol
from .registry import CheckpointSpec, Registry
from .results import ResultsStore, library_versions


#: default simulator workers per CPU core for a model on a GPU (--vla-workers not given): measured on an H200 host
#: with 16 cores and a 7B OpenVLA, 2 groups of 24 slots ran 87.5-91.7 actions/s against the kernel's 112.6-116.5 at
#: those batch sizes; with one worker per core the batches would be 8, where the kernel alone does 91 actions/s (B=16:
#: 110). 48 simulators alone ran 312 actions/s there, so more workers would not help; memory caps them (sizing.py)
GPU_WORKERS_PER_CORE = 3

#: --vla-compare with no name: each checkpoint's own `baseline` key in checkpoints.toml
BASELINE_FROM_ENTRY = "@entry"


class EvalSession:
    def __init__(self, registry: Registry, store: ResultsStore, settings: EvalSettings | None = None,
                 episodes: int | None = None, max_steps: int | None = None, compare: str | None = None,
                 gate: GateSettings | None = None, curtail: bool = False, baselines_dir: Path | None = None):
        self.registry = registry
        self.compare = compare
        self.gate = gate or GateSettings()
        self.curtail = curtail
        self.baselines_dir = baselines_dir
        self._baselines: dict[str, BaselineRun] = {}
        self.store = store
        self.settings = settings or EvalSettings()
        self.episodes = episodes
        self.max_steps = max_steps
        self.cache = ModelCache()
        self._policies: dict[tuple[str, str], Policy] = {}
        self._identities: dict[str, str] = {}
        self.results: list[TaskResult] = []
        self.proxy_results: dict[tuple[str, str], object] = {}  # (checkpoint, suite) -> OpenLoopResult
        self.robustness_results: list = []  # RobustnessResult, one per (checkpoint, robustness suite, task)
        self._unperturbed: dict[tuple[str, str, int], TaskResult] = {}  # (checkpoint, base suite, task) -> result
        #: (checkpoint, suite, task) -> its TaskRun, or the error that stops it (raised in its own test)
        self._runs: dict[tuple[str, str, int], TaskRun | Exception] = {}
        self._engine = None  # the Scheduler over one WorkerPool, made when the first episode must run
        #: called (job, outcome) after every committed episode of any task: a front end's live view
        self.on_episode: Callable | None = None
        self.data_overrides: dict[str, str] = {}  # suite -> dataset path (--vla-data)

    def protocol(self, suite: str) -> Protocol:
        return reference_protocol(suite, self.episodes, self.max_steps)

    def identity(self, spec: CheckpointSpec) -> str:
        if spec.name not in self._identities:
            self._identities[spec.name] = self.registry.identity(spec)
        return self._identities[spec.name]

    def policy(self, spec: CheckpointSpec, suite: str, device: str | None = None) -> Policy:
        key = (spec.name, suite, device)
        if key not in self._policies:
            self._policies[key] = build_policy(spec, BuildContext(self.registry, suite, self.cache, device))
        return self._policies[key]

    def replicas(self, spec: CheckpointSpec, suite: str) -> list[Policy]:
        """One policy per device of --vla-devices (one model replica each), or the entry's own device."""
        devices = self.settings.devices or [None]
        return [self.policy(spec, suite, device) for device in devices]

    # ---- closed loop: every task of the session on one engine ----------------------------------------------
    def plan(self, cases) -> None:
        """Make the TaskRuns of every (spec, suite, task_index) the session will evaluate, so the engine can run
        their episodes side by side from the first test on. A case that cannot run keeps its error for its own test."""
        for spec, suite, task_index in cases:
            try:
                self._task_run(spec, suite, task_index)
            except Exception:  # noqa: BLE001 - kept in self._runs; the case's own test raises it
                pass

    def _task_run(self, spec: CheckpointSpec, suite: str, task_index: int) -> TaskRun:
        key = (spec.name, suite, task_index)
        if key not in self._runs:
            try:
                self._runs[key] = self._new_task_run(spec, suite, task_index)
                if self._engine is not None:
                    self._engine.add(self._runs[key].job)
            except Exception as e:  # noqa: BLE001 - kept for the case's own test, which raises it
                self._runs[key] = e
        run = self._runs[key]
        if isinstance(run, Exception):
            raise run
        return run

    def _new_task_run(self, spec: CheckpointSpec, suite: str, task_index: int) -> TaskRun:
        task = suite_tasks(suite)[task_index]
        threshold = self.registry.threshold(spec, suite, task.task_id)
        protocol = self.protocol(suite)
        planned = range(protocol.episodes)
        baseline = self.baseline_for(spec)
        if baseline is not None:  # refuse an incomparable baseline before any episode runs
            check_protocol_matches(baseline, protocol, task.task_id, planned)
        stop = None
        if self.curtail or (baseline is not None and self.gate.looks):
            stop = stop_rule(planned, threshold, baseline.outcomes(task.task_id) if baseline else None, self.gate,
                             curtail=self.curtail)
        return TaskRun(self.replicas(spec, suite), spec, self.identity(spec), protocol, task_index, self.store,
                       self.settings, threshold, stop)

    def engine(self):
        """The session's Scheduler over one WorkerPool, sized for the episodes planned so far."""
        if self._engine is None:
            from .engine import sizing
            from .engine.pool import WorkerPool
            from .engine.scheduler import Scheduler

            runs = [r for r in self._runs.values() if isinstance(r, TaskRun)]
            todo = sum(len(r.job.todo) for r in runs)
            if self.settings.workers_auto:
                if any(d.startswith("cuda") for r in runs if not r.job.capabilities.in_worker for d in r.devices):
                    # a GPU model: enough slots that each group's batch is large and the simulator keeps up with it
                    self.settings.workers *= GPU_WORKERS_PER_CORE
                self.settings.workers = sizing.auto_workers(self.settings.workers)  # and no more than memory holds
                self.settings.workers_auto = False
            elif (warning := sizing.memory_warning(min(self.settings.workers, todo))) is not None:
                warnings.warn(warning, stacklevel=2)
            self._engine = Scheduler(WorkerPool(max(1, min(self.settings.workers, todo))), self.settings.groups,
                                     on_episode=lambda job, outcome: self.on_episode and self.on_episode(job, outcome))
            for run in runs:
                self._engine.add(run.job)
        return self._engine

    def evaluate(self, spec: CheckpointSpec, suite: str, task_index: int,
                 progress: Callable | None = None) -> TaskResult:
        run = self._task_run(spec, suite, task_index)
        run.progress = progress
        if not run.job.finished:
            engine = self.engine()
            engine.run(until=lambda: run.job.finished)
        run.progress = None
        result = run.result()
        baseline = self.baseline_for(spec)
        if baseline is not None:
            result.gate = gate_task(baseline, run.task.task_id, result.outcomes(), self.gate,
                                    run.protocol.episodes)
        self.results.append(result)
        return result

    def close(self) -> None:
        """Stop the engine's workers (episodes still in flight are not committed: a rerun resumes them)."""
        if self._engine is not None:
            workers = self._engine.pool.n
            self._engine.close()
            self._engine.pool.close()
            if self.settings.engine_stats is not None:
                write_json_atomically(self.settings.engine_stats,
                                      {**self._engine.stats.as_dict(), "workers": workers,
                                       "groups": self._engine.groups, "devices": self.settings.devices})
            self._engine = None
        self.store.close()

    def evaluate_robustness(self, spec: CheckpointSpec, suite: str, task_index: int,
                            progress_for: Callable[[str], Callable | None] | None = None):
        """A robustness variant's task (libero_goal_lan task1) and its unperturbed task (libero_goal task1), both
        run or resumed from the store, and the drop between them. progress_for(suite) gives each run's callback."""
        from .envs.tasks import init_states
        from .suites import split_robustness_suite
        from .robustness import RobustnessResult, drop_of, init_states_pair

        split = split_robustness_suite(suite)
        if split is None:
            raise VlaBenchError(f"{suite!r} is not a robustness suite")
        base = split[0]
        progress_for = progress_for or (lambda _suite: None)
        key = (spec.name, base, task_index)
        if key not in self._unperturbed:  # families share their base task: run and list it once per session
            self._unperturbed[key] = self.evaluate(spec, base, task_index, progress_for(base))
        base_result = self._unperturbed[key]
        perturbed = self.evaluate(spec, suite, task_index, progress_for(suite))
        planned = self.protocol(suite).episodes
        paired = init_states_pair(init_states(base, task_index)[:planned], init_states(suite, task_index)[:planned])
        result = RobustnessResult(suite, task_index, spec.name, base_result, perturbed,
                                  drop_of(base_result, perturbed, paired))
        self.robustness_results.append(result)
        return result

    # ---- baselines and gates ----------------------------------------------------------------------------------
    def baseline_for(self, spec: CheckpointSpec) -> BaselineRun | None:
        if self.compare is None:
            return None
        name = spec.baseline if self.compare == BASELINE_FROM_ENTRY else self.compare
        if name is None:
            raise VlaBenchError(f"{spec.where('baseline')}missing: --vla-compare without a name gates each "
                                "checkpoint against its `baseline` key; add one or pass --vla-compare NAME")
        if name not in self._baselines:
            self._baselines[name] = load_baseline(name, self.baselines_dir)
        return self._baselines[name]

    def candidate_runs(self, name: str = "candidate") -> list[tuple[str, str, BaselineRun]]:
        """This session's closed-loop results as baseline-format runs, one per (checkpoint, suite)."""
        groups: dict[tuple[str, str], dict[str, list]] = {}
        for r in self.results:
            spec = self.registry.get(r.checkpoint)
            records = self.store.finished(self.identity(spec), r.suite, r.task_index, self.protocol(r.suite).key())
            groups.setdefault((r.checkpoint, r.suite), {})[r.task_id] = list(records.values())
        runs = []
        for (checkpoint, suite), tasks in groups.items():
            spec = self.registry.get(checkpoint)
            runs.append((checkpoint, suite, run_from_records(name, self.protocol(suite), checkpoint,
                                                             self.identity(spec), library_versions(), tasks)))
        return runs

    def save_baselines(self, name: str) -> list[Path]:
        """--vla-save NAME: NAME.json when the run has one checkpoint and suite, else NAME-CHECKPOINT-SUITE.json."""
        runs = self.candidate_runs()
        paths = []
        for checkpoint, suite, run in runs:
            own = name if len(runs) == 1 else f"{name}-{checkpoint}-{suite}"
            paths.append(save_baseline(dataclasses.replace(run, name=own), self.baselines_dir))
        return paths

    def suite_verdicts(self) -> list[tuple[str, str, object]]:
        """The stratified suite-level gate (Holm-adjusted task verdicts inside) per (checkpoint, suite)."""
        out = []
        for checkpoint, suite, run in self.candidate_runs():
            baseline = self.baseline_for(self.registry.get(checkpoint))
            out.append((checkpoint, suite, compare_suite(task_pairs(baseline, run), **self.gate.kwargs())))
        return out

    def evaluate_proxy(self, spec: CheckpointSpec, suite: str):
        """Predict and score a whole open-loop dataset once per (checkpoint, suite); every metric test reads it."""
        key = (spec.name, suite)
        if key not in self.proxy_results:
            from .open_loop import evaluate_open_loop, open_loop_source, resolve_thresholds

            if suite in self.data_overrides:  # --vla-data: the path changes, the table's other keys stay
                dataset = {**self.registry.datasets.get(suite, {}), "path": self.data_overrides[suite]}
            else:
                dataset = self.registry.dataset(suite)
            overrides = {**self.registry.suite_thresholds.get(suite, {}), **spec.thresholds.get(suite, {})}
            result = evaluate_open_loop(self.policy(spec, suite), open_loop_source(suite, dataset),
                                        thresholds=resolve_thresholds(overrides))
            self.store.add_proxy_figures(spec.name, self.identity(spec), suite, result, library_versions())
            self.proxy_results[key] = result
        return self.proxy_results[key]


def session_from_options(registry: Registry, values: OptionValues) -> EvalSession:
    """The session that the evaluation options ask for (options.add_evaluation_options), for either front end."""
    gate = GateSettings.from_options(values("alpha"), values("compare-fail"), values("strict"), values("sequential"))
    data_overrides = {}
    for item in values("data"):
        suite, sep, path = item.partition("=")
        if not sep:
            raise VlaBenchError(f"{values.flag('data')} {item!r}: expected SUITE=PATH, e.g. bridge_v2=/data/bridge")
        data_overrides[suite] = path
    settings = EvalSettings(workers=values("workers") or default_workers(), workers_auto=values("workers") is None,
                            video=values("video"),
                            devices=parse_devices(values("devices")), groups=values("groups"),
                            engine_stats=Path(values("engine-stats")) if values("engine-stats") else None,
                            video_dir=Path(values("video-dir")), video_format=values("video-format"),
                            trajectories=values("trajectories"))
    session = EvalSession(registry, ResultsStore(Path(values("results"))), settings, values("episodes"),
                          values("max-steps"), compare=values("compare"), gate=gate, curtail=values("curtail"),
                          baselines_dir=Path(values("baselines")))
    session.data_overrides.update(data_overrides)
    return session


def write_json_atomically(path: Path, value) -> None:
    """Write to a temporary file beside `path`, then rename: a reader never sees half a file."""
    import json
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)
