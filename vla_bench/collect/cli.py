"""`vla-bench collect`: its arguments and the command (progress bars, the summary table, the exit status)."""
from __future__ import annotations


import numpy as np

from ..errors import choices
from ..suites import CLOSED_LOOP, get_suite, suite_names
from .episode import DEFAULT_CAMERAS
from .runner import DEFAULT_EXPERT, collect

def add_collect_arguments(parser) -> None:
    parser.add_argument("--suite", default="libero_spatial",
                        help=f"LIBERO suite ({choices(suite_names(CLOSED_LOOP))})")
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

    from ..envs.tasks import parse_task_id, suite_tasks

    suite = get_suite(args.suite, CLOSED_LOOP).name
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
