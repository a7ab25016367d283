"""pytest glue for pytest-xdist (`pytest -n N`, `--tx ssh=...`): every xdist worker is an evaluation session of its
own, and the controller (the process that prints the terminal summary) gathers what they measured.

How results reach the controller: each test report a worker sends carries, as one extra attribute, the session
results that test produced (TaskResults, robustness and open-loop results, the checkpoint identities) and the task's
measured store rows. pytest reports take extra attributes and xdist ships them as they are, so this is the report
mechanism xdist already has, per test rather than once per worker (`config.workeroutput` arrives only when a worker
ends cleanly: a worker that crashes on its tenth task would take the nine before it out of the summary). The
controller then holds the same EvalSession state a one-process run builds: the summary tables, the suite-level gate
and --vla-save run there, through the code `pytest -n 0` uses, instead of being rebuilt from store rows by a second
copy of the session's logic. The rows travel too because the controller's store must hold every episode for
--vla-save and the suite gate (they read the store): with one store shared on one host they are there already
(kept as they are), with one store per host they arrive this way.

Workers print no summary and no progress bar (plugin.py checks `is_worker`); each worker's default --vla-workers is
the host's CPUs divided by the xdist workers on that host.
"""
from __future__ import annotations

import base64
import dataclasses
import pickle

import pytest

#: the attribute of a worker's test report that carries vla-bench's results to the controller
REPORT_ATTRIBUTE = "vla_bench_results"
#: what the controller tells each worker: how many xdist workers share the worker's host
HOST_WORKERS_KEY = "vla_bench_host_workers"


def is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def is_controller(config: pytest.Config) -> bool:
    """True in the process that distributes tests to xdist workers (not under -n 0, not in a worker). xdist's own
    rule (its DSession is registered after our pytest_configure runs, so its presence cannot be asked yet)."""
    return (config.pluginmanager.hasplugin("xdist") and not is_worker(config)
            and not config.getoption("collectonly") and config.getoption("dist", "no") != "no"
            and bool(config.getoption("tx", None)))


def host_of(spec) -> str:
    """The host an execnet gateway spec runs on: popen workers share this host; `via` gateways run where their
    proxy runs; ssh / socket / vagrant ones on the host they name."""
    if spec.via:
        return f"via {spec.via}"
    if spec.popen:
        return "localhost"
    for kind in ("ssh", "socket", "vagrant_ssh"):
        if getattr(spec, kind):
            return f"{kind} {getattr(spec, kind)}"
    return str(spec)


def workers_sharing_host(specs, spec) -> int:
    """How many of the session's gateway specs (one per xdist worker) run on `spec`'s host, itself included."""
    return max(1, sum(host_of(s) == host_of(spec) for s in specs))


def default_simulator_workers(config: pytest.Config) -> int:
    """A worker's --vla-workers when none is given: its host's CPUs shared by the xdist workers on that host (a
    host's simulator processes then number its CPUs, as in a one-process run)."""
    from .evaluate import default_workers

    sharing = config.workerinput.get(HOST_WORKERS_KEY) or config.workerinput.get("workercount") or 1
    return max(1, default_workers() // int(sharing))


class WorkerSide:
    """Attaches what each test added to the worker's session to that test's reports."""

    def __init__(self, state):
        self.state = state  # plugin._State
        self.sent_results = 0
        self.sent_robustness = 0
        self.sent_proxy: set = set()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        payload = self._new_results()
        if payload is not None:
            setattr(report, REPORT_ATTRIBUTE, payload)
        return report

    def _new_results(self) -> str | None:
        session = self.state._session
        if session is None:
            return None
        results = session.results[self.sent_results:]
        robustness = session.robustness_results[self.sent_robustness:]
        # predictions (every predicted action) are not needed by the summary: only the figures travel
        proxy = {key: dataclasses.replace(result, predictions=[]) for key, result in session.proxy_results.items()
                 if key not in self.sent_proxy}
        if not (results or robustness or proxy):
            return None
        self.sent_results += len(results)
        self.sent_robustness += len(robustness)
        self.sent_proxy |= set(proxy)
        rows, identities = [], {}
        for r in results:
            spec = session.registry.get(r.checkpoint)
            identities[r.checkpoint] = session.identity(spec)
            rows += session.store.finished(identities[r.checkpoint], r.suite, r.task_index,
                                           session.protocol(r.suite).key()).values()
        for checkpoint, _suite in proxy:
            identities[checkpoint] = session.identity(session.registry.get(checkpoint))
        payload = {"results": results, "robustness": robustness, "proxy": proxy, "rows": rows,
                   "identities": identities}
        # pickled: the objects are the session's own dataclasses, and every host runs the same checkout; base64 keeps
        # the report JSON-serializable for plugins that log reports (pytest-reportlog)
        return base64.b64encode(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)).decode("ascii")


class ControllerSide:
    """Builds the controller's session from the workers' reports, in the order the tests were collected."""

    def __init__(self, state):
        self.state = state
        self.order: dict[str, int] = {}
        self.received: list[tuple[int, int, object]] = []  # (test's collection index, arrival, TaskResult)
        self.robustness: list[tuple[int, int, object]] = []
        self.errors: list[str] = []

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node) -> None:
        node.workerinput[HOST_WORKERS_KEY] = workers_sharing_host(node.nodemanager.specs, node.gateway.spec)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids) -> None:
        if not self.order:
            self.order = {nodeid: i for i, nodeid in enumerate(ids)}

    def pytest_runtest_logreport(self, report) -> None:
        encoded = getattr(report, REPORT_ATTRIBUTE, None)
        if encoded is None:
            return
        try:
            payload = pickle.loads(base64.b64decode(encoded))
        except Exception as e:  # noqa: BLE001 (whatever unpickling raises, the cause is the same)
            self.errors.append(f"{report.nodeid}: the worker's results could not be read ({type(e).__name__}: {e}); "
                               "every host must run the same vla-bench checkout and Python packages")
            return
        from .errors import VlaBenchError

        try:
            session = self.state.session
            for name, identity in payload["identities"].items():
                # the worker computed it: a remote entry's server or a model's files need not be reachable from here
                session._identities.setdefault(name, identity)
            session.store.add_missing(payload["rows"])
        except (VlaBenchError, pytest.UsageError) as e:  # the store named here cannot be opened or written
            self.errors.append(str(e))
            return
        index = self.order.get(report.nodeid, len(self.order))
        for bucket, items in ((self.received, payload["results"]), (self.robustness, payload["robustness"])):
            bucket.extend((index, len(bucket), item) for item in items)
        for key, result in payload["proxy"].items():
            session.proxy_results.setdefault(key, result)
        session.results[:] = _once_each(self.received, lambda r: (r.checkpoint, r.suite, r.task_index))
        session.robustness_results[:] = _once_each(self.robustness, lambda r: (r.checkpoint, r.suite, r.task_index))


def _once_each(received, key) -> list:
    """Results in collection order, each (checkpoint, suite, task) once: two workers may both evaluate the
    unperturbed task that robustness families share (a one-process run evaluates it once)."""
    seen, out = set(), []
    for _, _, result in sorted(received, key=lambda entry: entry[:2]):
        if key(result) not in seen:
            seen.add(key(result))
            out.append(result)
    return out


def register(config: pytest.Config, state) -> None:
    """plugin.py's pytest_configure: the side this process plays, if any."""
    if is_worker(config):
        config.pluginmanager.register(WorkerSide(state), "vla-bench-xdist-worker")
        if config.option.vla_workers is None:
            config.option.vla_workers = default_simulator_workers(config)
    elif is_controller(config):
        state.xdist_controller = ControllerSide(state)
        config.pluginmanager.register(state.xdist_controller, "vla-bench-xdist-controller")
