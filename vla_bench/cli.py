"""`vla-bench`: thin commands over the library (the pytest plugin uses the same functions and options).

Every VlaBenchError is printed as one line naming what to fix, with exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import VlaBenchError

COMMANDS = {}


def command(name: str, help: str):
    def register(fn):
        COMMANDS[name] = (fn, help)
        return fn
    return register


def _registry(args):
    from .registry import Registry

    return Registry.load(args.checkpoints_file)


@command("report", "print the results table from one results store, or several merged (--results repeated)")
def report(args) -> int:
    from .merge import merge_records
    from .options import DEFAULT_RESULTS
    from .report import closed_loop_summary, print_table, results_from_records
    from .results import ResultsStore

    paths = [Path(p) for p in (args.results or [DEFAULT_RESULTS])]
    sources = []
    for path in paths:
        if not path.is_file():
            raise VlaBenchError(f"{path}: no results store here (pytest writes one with --vla-results PATH)")
        store = ResultsStore(path, read_only=True)
        try:
            sources.append((str(path), store.episodes(checkpoint=args.checkpoint, suite=args.suite)))
        finally:
            store.close()
    records, disagreements = merge_records(sources)
    where = " + ".join(str(p) for p in paths)
    if not records:
        raise VlaBenchError(f"{where}: no episodes" + (f" for checkpoint {args.checkpoint!r}" if args.checkpoint
                                                       else "") + (f" in suite {args.suite!r}" if args.suite else ""))
    registry = None
    try:
        registry = _registry(args)
    except VlaBenchError:
        pass  # thresholds are shown when a checkpoints.toml is at hand; the figures need none
    rows = results_from_records(records)
    if registry is not None:
        for row in rows:
            if row.checkpoint in registry.checkpoints:
                row.threshold = registry.threshold(registry.checkpoints[row.checkpoint], row.suite, row.task_id)
    table, notes = closed_loop_summary(rows, registry, title=f"vla-bench: {where}")
    print_table(table)
    for note in notes:
        print(f"vla-bench: {note}")
    if disagreements:
        print(f"vla-bench: warning: {len(disagreements)} episode(s) measured in more than one store with different "
              "outcomes:", file=sys.stderr)
        for d in disagreements[:20]:
            print("  " + d.describe(), file=sys.stderr)
        if len(disagreements) > 20:
            print(f"  ... and {len(disagreements) - 20} more", file=sys.stderr)
    return 0


@command("gate", "gate a stored candidate run against a stored baseline run, without re-running anything")
def gate(args) -> int:
    from .baselines import load_baseline, task_pairs
    from .gate import GateSettings
    from .metrics.verdicts import compare_suite
    from .report import gate_table, print_table

    baseline = load_baseline(args.baseline, args.baselines)
    candidate = load_baseline(args.candidate, args.baselines)
    settings = GateSettings.from_options(args.alpha, args.fail, args.strict)  # options.add_gate_options, prefix ""
    verdict = compare_suite(task_pairs(baseline, candidate), **settings.kwargs())
    rows = [_GateRow(candidate.suite, t.task, candidate.checkpoint["name"], t) for t in verdict.tasks]
    print_table(gate_table(rows, [(candidate.checkpoint["name"], candidate.suite, verdict)],
                           title=f"vla-bench gate: {candidate.name} vs {baseline.name}"))
    failed = settings.fails(verdict.verdict) or any(settings.fails(t.verdict) for t in verdict.tasks)
    print(f"gate {'FAILED' if failed else 'passed'}: suite verdict {verdict.verdict}"
          + (f"; failing tasks: {', '.join(verdict.failed_tasks)}" if verdict.failed_tasks else ""))
    return 1 if failed else 0


class _GateRow:
    """A stored run's task in the shape gate_table reads (it shows the Holm-adjusted verdicts of compare_suite)."""

    def __init__(self, suite, task_id, checkpoint, verdict):
        self.suite, self.task_id, self.checkpoint, self.gate, self.saved = suite, task_id, checkpoint, verdict, 0


@command("run", "evaluate checkpoints on a suite without pytest: the session behind `pytest suites/SUITE`")
def run(args) -> int:
    """0 when every task (or gated metric) passes and no gate fails, 1 otherwise."""
    from .envs.tasks import check_episodes, parse_task_id, suite_tasks
    from .options import OptionValues, check_values
    from .report import closed_loop_summary, describe_figure, describe_gate, describe_scene_mismatch, \
        describe_task, gate_table, print_table, proxy_table
    from .session import session_from_options
    from .suites import get_suite

    suite = get_suite(args.suite)
    values = OptionValues(lambda dest: getattr(args, dest), prefix="")
    check_values(values)  # the checks the plugin makes before collection
    if suite.closed_loop:
        check_episodes(values("episodes"), suite.name)
    registry = _registry(args)
    names = registry.checkpoint_names(args.checkpoint, None if suite.closed_loop else suite.name)
    session = session_from_options(registry, values)
    failed = False
    try:
        if suite.closed_loop:
            tasks = ([parse_task_id(suite.name, str(t)) for t in args.tasks] if args.tasks
                     else range(len(suite_tasks(suite.name))))
            session.plan([(registry.get(name), suite.name, task) for name in names for task in tasks])
            for name in names:
                for task in tasks:
                    result = session.evaluate(registry.get(name), suite.name, task)
                    print(describe_task(result))
                    failed |= result.passed is False
                    if result.scene_mismatches:
                        print(("" if values("strict-sim") else "WARNING ") + describe_scene_mismatch(result))
                        failed |= bool(values("strict-sim"))
                    if result.gate is not None:
                        print(describe_gate(result))
                        failed |= session.gate.fails(result.gate.verdict)
            table, notes = closed_loop_summary(session.results, registry, session.data_overrides)
            print_table(table)
            for note in notes:
                print(f"vla-bench: {note}")
            if session.compare is not None:
                verdicts = session.suite_verdicts()
                print_table(gate_table(session.results, verdicts))
                failed |= any(session.gate.fails(v.verdict) for _, _, v in verdicts)
            if args.save:
                for path in session.save_baselines(args.save):
                    print(f"baseline saved: {path}")
        else:
            from .open_loop import GATED_METRICS

            for name in names:
                result = session.evaluate_proxy(registry.get(name), suite.name)
                for metric in GATED_METRICS:
                    print(describe_figure(suite.name, name, result.figures[metric]))
                    failed |= result.figures[metric].passed is False
            print_table(proxy_table(session.proxy_results))
    finally:
        session.close()
    print(f"results: {session.store.path}")
    return 1 if failed else 0


@command("collect", "scripted-expert demonstrations in LIBERO's HDF5 layout, from random resets")
def collect(args) -> int:
    from .collect.cli import run_collect

    return run_collect(args)


@command("finetune", "LoRA (or full) fine-tune an openvla entry on demonstrations -> a candidate entry")
def finetune(args) -> int:
    from .finetune.cli import run_finetune

    return run_finetune(args)


@command("doctor", "check that this simulator stack settles and renders LIBERO's scenes as the reference stack does")
def doctor(args) -> int:
    from .doctor import run_doctor

    return run_doctor(args)


@command("serve", "serve a checkpoints.toml entry over the openpi or vla-eval websocket protocol, batched")
def serve(args) -> int:
    from .serve.cli import run_serve

    return run_serve(args, _registry(args))


@command("checkpoints", "list the entries of checkpoints.toml")
def checkpoints(args) -> int:
    registry = _registry(args)
    for name, spec in registry.checkpoints.items():
        mark = " (default)" if name == registry.default else ""
        try:
            identity = registry.identity(spec)
        except VlaBenchError as e:  # e.g. a remote entry whose server is down: the other entries still list
            identity = f"unavailable ({e})"
        print(f"{name}{mark}: kind={spec.kind} identity={identity}")
    return 0


@command("suites", "list the suites (vla_bench/suites.py) with their kind")
def suites(args) -> int:
    from .suites import SUITES

    for suite in SUITES.values():
        print(f"{suite.name}\t{suite.kind}\t{suite.description}")
    return 0


@command("tasks", "list the tasks of a LIBERO suite with their test ids")
def tasks(args) -> int:
    from .envs.tasks import suite_tasks

    for task in suite_tasks(args.suite):
        print(f"{task.task_id}\t{task.language}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .options import add_checkpoints_file_option, add_evaluation_options, add_gate_options, \
        add_results_sources_option

    common = argparse.ArgumentParser(add_help=False)
    add_checkpoints_file_option(common.add_argument)
    parser = argparse.ArgumentParser(prog="vla-bench", description="Evaluate VLA robot policies.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, parents=[common])
        p.set_defaults(func=fn)
        if name == "run":
            p.add_argument("suite", help="a suite name, as in suites/ (vla-bench suites lists them)")
            p.add_argument("--tasks", nargs="+", default=None, help="task numbers, 1-based: '1 2' or 'task1 task2' "
                           "(default: all; closed-loop suites)")
            add_evaluation_options(p.add_argument, prefix="")  # the plugin's options without their vla- prefix
        if name == "report":
            add_results_sources_option(p.add_argument)
            p.add_argument("--checkpoint", default=None)
            p.add_argument("--suite", default=None)
        if name == "tasks":
            p.add_argument("suite")
        if name == "collect":
            from .collect.cli import add_collect_arguments

            add_collect_arguments(p)
        if name == "doctor":
            from .doctor import add_doctor_arguments

            add_doctor_arguments(p)
        if name == "finetune":
            from .finetune.cli import add_finetune_arguments

            add_finetune_arguments(p)
        if name == "serve":
            from .serve.cli import add_serve_arguments

            add_serve_arguments(p)
        if name == "gate":
            p.add_argument("baseline", help="baseline run: a name in --baselines or a .json path")
            p.add_argument("candidate", help="candidate run (saved with --vla-save): a name or a .json path")
            add_gate_options(p.add_argument, prefix="")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VlaBenchError as e:
        print(f"vla-bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
