"""The state of one evaluation session: registry, results store, policy cache and the results so far.

Both front ends use it: the pytest plugin keeps one per pytest session, the CLI one per command. Policies are
built once per (checkpoint, suite) and their heavy parts (models) are shared through one ModelCache.
"""
from __future__ import annotations

from typing import Callable

from .envs.tasks import suite_tasks
from .evaluate import EvalSettings, TaskResult, evaluate_task
from .policies import BuildContext, ModelCache, Policy, build_policy
from .protocol import Protocol, reference_protocol
from .registry import CheckpointSpec, Registry
from .results import ResultsStore


class EvalSession:
    def __init__(self, registry: Registry, store: ResultsStore, settings: EvalSettings | None = None,
                 episodes: int | None = None, max_steps: int | None = None):
        self.registry = registry
        self.store = store
        self.settings = settings or EvalSettings()
        self.episodes = episodes
        self.max_steps = max_steps
        self.cache = ModelCache()
        self._policies: dict[tuple[str, str], Policy] = {}
        self._identities: dict[str, str] = {}
        self.results: list[TaskResult] = []
        self.proxy_results: dict[tuple[str, str], object] = {}  # (checkpoint, suite) -> OpenLoopResult
        self.data_overrides: dict[str, str] = {}  # suite -> dataset path (--vla-data)

    def protocol(self, suite: str) -> Protocol:
        return reference_protocol(suite, self.episodes, self.max_steps)

    def identity(self, spec: CheckpointSpec) -> str:
        if spec.name not in self._identities:
            self._identities[spec.name] = self.registry.identity(spec)
        return self._identities[spec.name]

    def policy(self, spec: CheckpointSpec, suite: str) -> Policy:
        key = (spec.name, suite)
        if key not in self._policies:
            self._policies[key] = build_policy(spec, BuildContext(self.registry, suite, self.cache))
        return self._policies[key]

    def evaluate(self, spec: CheckpointSpec, suite: str, task_index: int,
                 progress: Callable | None = None) -> TaskResult:
        task = suite_tasks(suite)[task_index]
        threshold = self.registry.threshold(spec, suite, task.task_id)
        result = evaluate_task(self.policy(spec, suite), spec, self.identity(spec), self.protocol(suite),
                               task_index, self.store, self.settings, progress, threshold)
        self.results.append(result)
        return result

    def evaluate_proxy(self, spec: CheckpointSpec, suite: str):
        """Predict and score a whole open-loop dataset once per (checkpoint, suite); every metric test reads it."""
        key = (spec.name, suite)
        if key not in self.proxy_results:
            from .proxy import evaluate_open_loop, resolve_thresholds
            from .proxy_suites import open_loop_source, store_figures
            from .results import library_versions

            if suite in self.data_overrides:  # --vla-data: the path changes, the table's other keys stay
                dataset = {**self.registry.datasets.get(suite, {}), "path": self.data_overrides[suite]}
            else:
                dataset = self.registry.dataset(suite)
            overrides = {**self.registry.suite_thresholds.get(suite, {}), **spec.thresholds.get(suite, {})}
            result = evaluate_open_loop(self.policy(spec, suite), open_loop_source(suite, dataset),
                                        thresholds=resolve_thresholds(overrides))
            store_figures(self.store.db, spec.name, self.identity(spec), suite, result, library_versions())
            self.proxy_results[key] = result
        return self.proxy_results[key]
