"""pytest glue: options, parametrization, fixtures, -k task selection, live progress, terminal summary.

No evaluation logic lives here: the options are declared in vla_bench/options.py, and everything else is a call
into vla_bench.session / report, which `vla-bench run` uses too. A suite module declares `SUITE = "libero_spatial"`
(a record of vla_bench/suites.py) and a test taking the `libero_task` fixture; this
plugin turns it into one test case per (task, checkpoint) with ids like `task1-expert`.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from .errors import VlaBenchError
from .options import OptionValues, add_checkpoints_file_option, add_evaluation_options, check_values
from .video import require_video_writer

_TASK_WORD = re.compile(r"task\d+", re.IGNORECASE)
_IDENT = re.compile(r"(?:\w|:|\+|-|\.|\[|\]|\\|/)+")  # pytest's -k identifier characters


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vla-bench", "vla-bench: robot policy evaluation")
    add_checkpoints_file_option(group.addoption)
    add_evaluation_options(group.addoption, prefix="vla-")  # `vla-bench run` declares the same, unprefixed


@dataclasses.dataclass(frozen=True)
class LiberoCase:
    suite: str
    task_index: int
    checkpoint: str

    @property
    def id(self) -> str:
        return f"task{self.task_index + 1}-{self.checkpoint}"


@dataclasses.dataclass(frozen=True)
class RobustnessCase(LiberoCase):
    """A task of a robustness variant: `suite` is LIBERO-PRO's name (libero_goal_lan), and so is the id's first
    word, so `-k libero_goal_lan` picks one variant, `-k _lan` one family, `-k task1` the first tasks exactly."""

    @property
    def id(self) -> str:
        return f"{self.suite}-task{self.task_index + 1}-{self.checkpoint}"


class _State:
    """The plugin's per-session objects, created lazily so that runs without vla-bench tests pay nothing."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self._session = None
        self.suite_verdicts: list = []
        self.saved_baselines: list = []
        self.xdist_controller = None  # xdist_glue.ControllerSide, in the controller of a pytest -n N run
        #: what parametrization refused (unknown checkpoint, too many episodes...): one usage error after collection
        self.collection_errors: dict[str, None] = {}

    @property
    def registry(self):
        from .registry import Registry, default_path

        if not hasattr(self, "_registry"):
            from .policies.kinds import register_kinds

            for kinds in user_checkpoint_kinds(self.config.pluginmanager):
                register_kinds(kinds)
            path = self.config.getoption("--checkpoints-file") or default_path(self.config.invocation_params.dir)
            self._registry = Registry.load(path)
        return self._registry

    def checkpoint_names(self, suite: str | None = None) -> list[str]:
        """--checkpoint names, else the suite's own defaults ([datasets.SUITE] checkpoints), else `default`."""
        return self.registry.checkpoint_names(self.config.getoption("--checkpoint"), suite)

    @property
    def session(self):
        if self._session is None:
            from .session import session_from_options

            try:
                self._session = session_from_options(self.registry, OptionValues(self.config.getoption, "vla-"))
            except VlaBenchError as e:
                raise _usage_error(e) from None
        return self._session


_STATE = pytest.StashKey[_State]()


def user_checkpoint_kinds(pluginmanager) -> list[dict[str, str]]:
    """The {kind: module} tables of every registered plugin's `vla_bench_checkpoint_kinds()` (vla_bench/hookspec.py:
    pytest itself calls only `pytest_`-prefixed hooks), in a stable order."""
    tables = []
    for name, plugin in sorted(pluginmanager.list_name_plugin(), key=lambda pair: str(pair[0])):
        hook = getattr(plugin, "vla_bench_checkpoint_kinds", None)
        if not callable(hook):
            continue
        kinds = hook()
        if not isinstance(kinds, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in kinds.items()):
            where = getattr(plugin, "__file__", name)
            raise VlaBenchError(f"{where}: vla_bench_checkpoint_kinds() must return {{kind name: module path}} "
                                f"strings, got {kinds!r}")
        tables.append(kinds)
    return tables


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_STATE] = _State(config)
    _check_options(config)
    from .xdist_glue import register

    register(config, config.stash[_STATE])  # under pytest -n N: this process's side (worker or controller)
    if config.getoption("--video") != "none":  # before any episode runs, not after the first one
        try:
            require_video_writer(config.getoption("--video-format"))
        except VlaBenchError as e:
            raise _usage_error(e) from None


def _check_options(config: pytest.Config) -> None:
    """Option values that are wrong whatever is collected: one usage error before collection, not one failed test
    per task (the rules are options.check_values, which `vla-bench run` applies too)."""
    try:
        check_values(OptionValues(config.getoption, "vla-"))
    except VlaBenchError as e:
        raise _usage_error(e) from None


def pytest_sessionstart(session: pytest.Session) -> None:
    """`pytest suites/libero_nosuch`: pytest would say only "file or directory not found"; name the suites."""
    for arg in session.config.args:
        path = Path(session.config.invocation_params.dir, arg.split("::")[0])
        if path.exists() or not path.parent.is_dir():
            continue
        suites = sorted(p.name for p in path.parent.iterdir() if p.is_dir() and any(p.glob("test_*.py"))
                        and any("SUITE = " in f.read_text(errors="replace") for f in p.glob("test_*.py")))
        if suites:
            raise pytest.UsageError(f"{arg}: no such suite; suites in {path.parent}: {', '.join(suites)}")


def _usage_error(error: VlaBenchError) -> pytest.UsageError:
    return pytest.UsageError(str(error))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "proxy_metric" in metafunc.fixturenames:
        return _parametrize_proxy(metafunc)
    if "libero_pro_task" in metafunc.fixturenames:
        return _parametrize_robustness(metafunc)
    if "libero_task" not in metafunc.fixturenames:
        return
    suite = getattr(metafunc.module, "SUITE", None)
    if suite is None:
        raise pytest.UsageError(f"{metafunc.module.__file__}: a test using `libero_task` needs SUITE = '<suite>'")
    state = metafunc.config.stash[_STATE]
    try:
        from .envs.tasks import check_episodes, suite_tasks

        names = state.checkpoint_names()
        tasks = suite_tasks(suite)
        check_episodes(metafunc.config.getoption("--episodes"), suite)
        cases = [LiberoCase(suite, task.index, name) for task in tasks for name in names]
    except VlaBenchError as e:
        state.collection_errors[str(e)] = None  # raised once collection ends, as a usage error
        return
    metafunc.parametrize("libero_task", cases, ids=[c.id for c in cases], indirect=True)


def _parametrize_robustness(metafunc: pytest.Metafunc) -> None:
    """One case per (family, base suite, task, checkpoint), in that order; a module may narrow the families or
    the bases with FAMILIES = (...) / BASES = (...)."""
    from .suites import ROBUSTNESS_BASES, ROBUSTNESS_FAMILIES, robustness_suite

    state = metafunc.config.stash[_STATE]
    try:
        from .envs.tasks import suite_tasks

        names = state.checkpoint_names()
        cases = [RobustnessCase(suite, task.index, name)
                 for family in getattr(metafunc.module, "FAMILIES", tuple(ROBUSTNESS_FAMILIES))
                 for base in getattr(metafunc.module, "BASES", ROBUSTNESS_BASES)
                 for suite in [robustness_suite(base, family)]
                 for task in suite_tasks(suite) for name in names]
    except VlaBenchError as e:
        raise _usage_error(e) from None
    metafunc.parametrize("libero_pro_task", cases, ids=[c.id for c in cases], indirect=True)


@dataclasses.dataclass(frozen=True)
class ProxyCase:
    suite: str
    metric: str
    checkpoint: str

    @property
    def id(self) -> str:
        return f"{self.metric}-{self.checkpoint}"


def _parametrize_proxy(metafunc: pytest.Metafunc) -> None:
    from .open_loop import GATED_METRICS

    suite = getattr(metafunc.module, "SUITE", None)
    state = metafunc.config.stash[_STATE]
    try:
        from .suites import OPEN_LOOP, get_suite

        get_suite(suite, OPEN_LOOP)
        names = state.checkpoint_names(suite)
    except VlaBenchError as e:
        state.collection_errors[str(e)] = None
        return
    cases = [ProxyCase(suite, metric, name) for name in names for metric in GATED_METRICS]
    metafunc.parametrize("proxy_metric", cases, ids=[c.id for c in cases], indirect=True)


class ProxyMetricRunner:
    """What an open-loop suite test receives: `evaluate()` gives its metric's figure (the dataset is predicted
    once per checkpoint and suite, then shared by every metric's test)."""

    def __init__(self, config: pytest.Config, case: ProxyCase):
        self.config = config
        self.case = case

    def evaluate(self):
        session = self.config.stash[_STATE].session
        try:
            result = session.evaluate_proxy(session.registry.get(self.case.checkpoint), self.case.suite)
        except VlaBenchError as e:
            pytest.fail(str(e), pytrace=False)
        return result.figures[self.case.metric]

    def describe(self, figure) -> str:
        from .report import describe_figure

        return describe_figure(self.case.suite, self.case.checkpoint, figure)


@pytest.fixture
def proxy_metric(request: pytest.FixtureRequest) -> ProxyMetricRunner:
    return ProxyMetricRunner(request.config, request.param)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Make `-k task1` mean task 1, never task10..task19.

    pytest's -k matches substrings, and no naming scheme keeps "task1" out of "task10" while `-k task10` still
    works. So when the -k expression names a task word (taskN), this hook evaluates the whole expression itself,
    with taskN matched exactly against the item's task and every other word matched as pytest does, then clears
    the option so pytest does not apply its substring rule again. Expressions without a task word are untouched.
    """
    errors = config.stash[_STATE].collection_errors
    if errors:
        raise pytest.UsageError("\n".join(errors))
    expression_text = config.option.keyword.lstrip()
    if not expression_text or not _TASK_WORD.search(expression_text):
        return
    from _pytest.mark import KeywordMatcher  # pytest's own matcher, so the rest of -k behaves exactly as usual
    from _pytest.mark.expression import Expression

    try:
        expression = Expression.compile(expression_text)
    except Exception:
        return  # let pytest report the malformed expression in its own words
    # the words of the expression, by pytest's identifier rule (Expression.idents() exists only from pytest 9.2)
    if not any(_TASK_WORD.fullmatch(word) for word in _IDENT.findall(expression_text)):
        return
    remaining, deselected = [], []
    for item in items:
        default = KeywordMatcher.from_item(item)
        params = getattr(getattr(item, "callspec", None), "params", {})
        case = params.get("libero_task", params.get("libero_pro_task"))
        own_task = f"task{case.task_index + 1}" if isinstance(case, LiberoCase) else None

        def matcher(word: str, /, **kwargs) -> bool:
            if _TASK_WORD.fullmatch(word):
                return own_task is not None and word.lower() == own_task
            return default(word, **kwargs)

        (remaining if expression.evaluate(matcher) else deselected).append(item)
    if not remaining:
        _check_task_words(expression_text, items)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = remaining
    config.option.keyword = ""


def _check_task_words(expression_text: str, items: list[pytest.Item]) -> None:
    """-k selected nothing: when it names a task no collected suite has, say which tasks there are."""
    from .envs.tasks import suite_tasks

    cases = [getattr(getattr(item, "callspec", None), "params", {}).get("libero_task") for item in items]
    suites = sorted({case.suite for case in cases if isinstance(case, LiberoCase)})
    if not suites:
        return
    sizes = {suite: len(suite_tasks(suite)) for suite in suites}
    words = [w for w in _IDENT.findall(expression_text) if _TASK_WORD.fullmatch(w)]
    missing = [w for w in words if not any(1 <= int(w[4:]) <= n for n in sizes.values())]
    if missing:
        ranges = "; ".join(f"{suite}: task1 ... task{n}" for suite, n in sizes.items())
        raise pytest.UsageError(f"-k {expression_text!r}: no task {', '.join(missing)} in the collected suites "
                                f"({ranges})")


def pytest_collection_finish(session: pytest.Session) -> None:
    """Open the results store (and read --vla-data) once, before any test runs, so that a bad --vla-results is
    one usage error rather than a failure per test."""
    if session.config.option.collectonly:
        return
    fixtures = {"libero_task", "libero_pro_task", "proxy_metric"}
    if any(fixtures & set(getattr(item, "fixturenames", ())) for item in session.items):
        try:
            session.config.stash[_STATE].session  # noqa: B018 (creates it)
        except VlaBenchError as e:
            raise _usage_error(e) from None
        _plan(session)


def _closed_loop_cases(items) -> list:
    """The (checkpoint, suite, task) cases the selected closed-loop tests will evaluate, in test order; a robustness
    case brings its unperturbed twin first."""
    from .suites import split_robustness_suite

    cases = []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        case = params.get("libero_task") or params.get("libero_pro_task")
        if case is None:
            continue
        if isinstance(case, RobustnessCase):
            cases.append((case.checkpoint, split_robustness_suite(case.suite)[0], case.task_index))
        cases.append((case.checkpoint, case.suite, case.task_index))
    return list(dict.fromkeys(cases))


def _plan(session: pytest.Session) -> None:
    """Hand every selected closed-loop task to the engine before the first test, so their episodes share one pool
    (the first test's task is served first). Under pytest-xdist a worker does not know in advance which tests it
    will get, so there each test plans its own task when it runs."""
    if hasattr(session.config, "workerinput"):
        return
    state = session.config.stash[_STATE]
    vla = state.session
    vla.plan([(state.registry.get(c), suite, task) for c, suite, task in _closed_loop_cases(session.items)])


class _Progress:
    """The live view: a transient rich display shown while a test waits for its task's episodes, outside pytest's
    output capture (so it never mixes with pytest's lines). One bar for the test's task and one line for the whole
    session's engine: episodes done of planned, successes, episodes/s, actions/s and the policy's (GPU's) busy
    fraction. Episodes of later tasks that finish meanwhile are counted on the session line."""

    def __init__(self, config: pytest.Config, case: LiberoCase, total: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        from .xdist_glue import is_worker

        self.capture = config.pluginmanager.getplugin("capturemanager")
        # -q keeps the screen quiet; an xdist worker's bar would interleave with the others' on the controller's
        self.enabled = config.getoption("verbose") >= 0 and not is_worker(config)
        self.session = config.stash[_STATE].session
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[successes]} successes"), TextColumn("{task.fields[rates]}"),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 console=Console(stderr=True), transient=True)
        self.task = self.progress.add_task(f"{case.suite} {case.id}", total=total, successes=0, rates="")
        self.engine_row = self.progress.add_task("session", total=None, successes=0, rates="")
        self.successes = 0
        self.session_successes = 0  # of the episodes finished while this view is shown
        self.session.on_episode = self.on_episode

    def on_episode(self, job, outcome) -> None:
        engine = self.session._engine
        if engine is None:
            return
        stats = engine.stats
        planned = sum(len(j.init_indices) for j in engine.jobs)
        self.session_successes += bool(outcome.success)
        wall = stats.wall_s or 1e-9
        self.progress.update(self.engine_row, completed=stats.episodes, total=planned,
                             successes=self.session_successes,
                             rates=f"{stats.episodes / wall:.2f} episodes/s, {stats.actions / wall:.0f} actions/s, "
                                   f"policy busy {stats.busy:.0%}")

    def __enter__(self):
        if self.enabled:
            self._suspend = self.capture.global_and_fixture_disabled() if self.capture else None
            if self._suspend:
                self._suspend.__enter__()
            self.progress.start()
        return self

    def update(self, outcome, done: int, total: int) -> None:
        self.successes += bool(outcome.success)
        self.progress.update(self.task, completed=done, successes=self.successes)

    def __exit__(self, *exc):
        self.session.on_episode = None
        if self.enabled:
            self.progress.stop()
            if self._suspend:
                self._suspend.__exit__(*exc)


class LiberoTaskRunner:
    """What a LIBERO suite test receives: `evaluate()` runs (or resumes) the case and returns its TaskResult."""

    def __init__(self, config: pytest.Config, case: LiberoCase, node: pytest.Item):
        self.config = config
        self.case = case
        self.node = node

    def evaluate(self):
        session = self.config.stash[_STATE].session
        spec = session.registry.get(self.case.checkpoint)
        total = session.protocol(self.case.suite).episodes
        try:
            with _Progress(self.config, self.case, total) as progress:
                result = session.evaluate(spec, self.case.suite, self.case.task_index, progress.update)
        except VlaBenchError as e:
            pytest.fail(str(e), pytrace=False)
        self._record_properties(result)
        self._fail_on_moved_scenes(result)
        return result

    def _fail_on_moved_scenes(self, *results) -> None:
        """--vla-strict-sim: a task whose episodes started from a scene unlike the reference stack's fails."""
        if self.config.getoption("--vla-strict-sim"):
            for result in results:
                if result.scene_mismatches:
                    pytest.fail(self.describe_scene_mismatch(result), pytrace=False)

    @staticmethod
    def describe_scene_mismatch(result) -> str:
        from .report import describe_scene_mismatch

        return describe_scene_mismatch(result)

    def _record_properties(self, result) -> None:
        """The figures as JUnit XML properties (--junitxml), for CI systems."""
        low, high = result.interval
        props = {"successes": result.successes, "episodes": result.episodes, "errors": result.errors,
                 "rate": round(result.rate, 4), "ci_low": round(low, 4), "ci_high": round(high, 4),
                 "threshold": None if result.threshold is None else result.threshold.as_plain(),
                 "episodes_saved": result.saved,
                 "scene_mismatches": len(result.scene_mismatches)}
        if result.gate is not None:
            g = result.gate
            props.update({f"gate_{k}": getattr(g, k) for k in ("verdict", "baseline_rate", "candidate_rate",
                          "difference", "difference_low", "difference_high", "pvalue", "test", "detectable_drop")})
        self.node.user_properties.extend(props.items())

    def gate_failed(self, result) -> bool:
        session = self.config.stash[_STATE].session
        return result.gate is not None and session.gate.fails(result.gate.verdict)

    @staticmethod
    def describe_gate(result) -> str:
        from .report import describe_gate

        return describe_gate(result)

    @staticmethod
    def describe(result) -> str:
        from .report import describe_task

        return describe_task(result)


@pytest.fixture
def libero_task(request: pytest.FixtureRequest) -> LiberoTaskRunner:
    return LiberoTaskRunner(request.config, request.param, request.node)


class RobustnessTaskRunner(LiberoTaskRunner):
    """What a robustness suite test receives: `evaluate()` runs (or resumes) the perturbed task and its unperturbed
    twin with the same checkpoint and returns the RobustnessResult (both TaskResults and the drop)."""

    def evaluate(self):
        session = self.config.stash[_STATE].session
        spec = session.registry.get(self.case.checkpoint)
        total = session.protocol(self.case.suite).episodes
        bars = []

        def progress_for(suite):
            bar = _Progress(self.config, LiberoCase(suite, self.case.task_index, self.case.checkpoint), total)
            bars.append(bar.__enter__())
            return bar.update

        try:
            result = session.evaluate_robustness(spec, self.case.suite, self.case.task_index, progress_for)
        except VlaBenchError as e:
            pytest.fail(str(e), pytrace=False)
        finally:
            for bar in bars:
                bar.__exit__(None, None, None)
        self._record_properties(result.perturbed)
        self._fail_on_moved_scenes(result.base, result.perturbed)
        d = result.drop
        self.node.user_properties.extend([("base_rate", round(result.base.rate, 4)), ("drop", round(d.drop, 4)),
                                          ("drop_low", round(d.low, 4)), ("drop_high", round(d.high, 4)),
                                          ("drop_paired", d.paired), ("drop_pvalue", d.pvalue)])
        return result

    @staticmethod
    def describe(result) -> str:
        from .report import describe_robustness

        return describe_robustness(result)


@pytest.fixture
def libero_pro_task(request: pytest.FixtureRequest) -> RobustnessTaskRunner:
    return RobustnessTaskRunner(request.config, request.param, request.node)


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    from .xdist_glue import is_worker

    state = config.stash.get(_STATE, None)
    if state is not None and state.xdist_controller is not None:
        for error in state.xdist_controller.errors:
            terminalreporter.write_line(f"vla-bench: error: {error}", red=True, bold=True)
    if is_worker(config):  # under xdist the controller prints the one summary, from every worker's results
        return
    session = state._session if state is not None else None
    if session is None or not (session.results or session.proxy_results):
        return
    from rich.console import Console

    from .report import closed_loop_summary, proxy_table, robustness_table

    console = Console(file=terminalreporter._tw._file, force_terminal=terminalreporter._tw.hasmarkup,
                      width=max(terminalreporter._tw.fullwidth, 220))
    terminalreporter.section("vla-bench")
    if session.results:
        table, notes = closed_loop_summary(session.results, session.registry, session.data_overrides)
        console.print(table)
        for note in notes:
            terminalreporter.write_line(f"vla-bench: {note}", yellow=True)
    if session.robustness_results:
        console.print(robustness_table(session.robustness_results))
    if session.proxy_results:
        console.print(proxy_table(session.proxy_results))
    for result in session.results:
        if result.scene_mismatches:
            terminalreporter.write_line("WARNING " + LiberoTaskRunner.describe_scene_mismatch(result),
                                        red=True, bold=True)
    if any(r.gate is not None for r in session.results):
        from .report import gate_table

        console.print(gate_table(session.results, state.suite_verdicts))
    for path in state.saved_baselines:
        terminalreporter.write_line(f"baseline saved: {path}")
    terminalreporter.write_line(f"results: {session.store.path}  (vla-bench report --results PATH)")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus) -> None:
    """Suite-level gates (a stratified test across the run's tasks) and --vla-save, once every task has run: in the
    one process that saw every task (under xdist the controller, never a worker, which saw only its share)."""
    from .xdist_glue import is_worker

    state = session.config.stash.get(_STATE, None)
    if state is not None and state.xdist_controller is not None and state.xdist_controller.errors:
        session.exitstatus = pytest.ExitCode.USAGE_ERROR
    if is_worker(session.config) or state is None or state._session is None or not state._session.results:
        return
    try:
        if state._session.compare is not None:
            state.suite_verdicts = state._session.suite_verdicts()
            if any(state._session.gate.fails(v.verdict) for _, _, v in state.suite_verdicts):
                session.exitstatus = pytest.ExitCode.TESTS_FAILED
        name = session.config.getoption("--vla-save")
        if name:
            state.saved_baselines = state._session.save_baselines(name)
    except VlaBenchError as e:
        session.config.get_terminal_writer().line(f"vla-bench: error: {e}", red=True)
        session.exitstatus = pytest.ExitCode.USAGE_ERROR


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is not None and state._session is not None:
        state._session.close()
