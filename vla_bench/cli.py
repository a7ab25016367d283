"""`vla-bench`: thin commands over the library (the pytest plugin uses the same functions).

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


@command("report", "print the results table from a results store")
def report(args) -> int:
    from .report import print_table, results_from_records, task_table
    from .results import ResultsStore

    path = Path(args.results)
    if not path.is_file():
        raise VlaBenchError(f"{path}: no results store here (pytest writes one with --vla-results PATH)")
    store = ResultsStore(path, read_only=True)
    records = store.episodes(checkpoint=args.checkpoint, suite=args.suite)
    if not records:
        raise VlaBenchError(f"{path}: no episodes" + (f" for checkpoint {args.checkpoint!r}" if args.checkpoint else "")
                            + (f" in suite {args.suite!r}" if args.suite else ""))
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
    print_table(task_table(rows, title=f"vla-bench: {path}"))
    return 0


@command("gate", "gate a stored candidate run against a stored baseline run, without re-running anything")
def gate(args) -> int:
    from .baselines import load_baseline, task_pairs
    from .gating import GateSettings
    from .metrics.gate import compare_suite
    from .report import gate_table, print_table

    baseline = load_baseline(args.baseline, args.baselines)
    candidate = load_baseline(args.candidate, args.baselines)
    settings = GateSettings.from_options(args.alpha, args.fail, args.strict)
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


@command("collect", "scripted-expert demonstrations in LIBERO's HDF5 layout, from random resets")
def collect(args) -> int:
    from .collect import run_collect

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


@command("tasks", "list the tasks of a LIBERO suite with their test ids")
def tasks(args) -> int:
    from .envs.tasks import suite_tasks

    for task in suite_tasks(args.suite):
        print(f"{task.task_id}\t{task.language}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoints-file", default=None, help="checkpoints.toml (default: nearest one)")
    parser = argparse.ArgumentParser(prog="vla-bench", description="Evaluate VLA robot policies.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, parents=[common])
        p.set_defaults(func=fn)
        if name == "report":
            p.add_argument("--results", default="results/vla-bench.sqlite")
            p.add_argument("--checkpoint", default=None)
            p.add_argument("--suite", default=None)
        if name == "tasks":
            p.add_argument("suite")
        if name == "collect":
            from .collect import add_collect_arguments

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
            p.add_argument("--baselines", default="baselines", help="folder of stored runs (default baselines/)")
            p.add_argument("--alpha", type=float, default=0.05)
            p.add_argument("--fail", default=None, metavar="drop:5pp", help="non-inferiority margin")
            p.add_argument("--strict", action="store_true", help="inconclusive fails too")
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
