"""Rich tables of results: the pytest terminal summary and `vla-bench report` print the same table."""
from __future__ import annotations

from typing import Iterable, Mapping

from rich.console import Console
from rich.table import Table

from .evaluate import TaskResult, summarize
from .metrics.episode_figures import ActionFigures
from .results import EpisodeRecord
from .thresholds import describe as describe_threshold


def verdict_text(passed: bool | None) -> str:
    return {True: "[green]PASS[/]", False: "[red]FAIL[/]", None: "[yellow]-[/]"}[passed]


#: the action-figure columns: (header, ActionFigures field, format)
_ACTION_COLUMNS = (("arm |a|", "arm_magnitude", "{:.3f}"), ("near-zero", "near_zero", "{:.0%}"),
                   ("gripper sw.", "gripper_switches", "{:.1f}"))


def task_table(results: Iterable[TaskResult], title: str = "vla-bench: closed-loop success",
               demonstrations: Mapping[tuple[str, int], ActionFigures] | None = None) -> Table:
    """One row per task. Beside the success figures: the episodes' mean arm-action magnitude, fraction of
    near-zero arm actions and gripper switches (metrics/episode_figures.py), with the demonstrations' own figures
    in brackets where `demonstrations` ({(suite, task index): figures}, demonstrations.py) knows the task, and
    the failed episodes counted by how they stopped."""
    results = list(results)
    demonstrations = demonstrations or {}
    table = Table(title=title, title_justify="left")
    shown_demos = any((r.suite, r.task_index) in demonstrations for r in results)
    action_headers = [header + (" (demos)" if shown_demos else "") for header, _, _ in _ACTION_COLUMNS]
    for column, justify in (("suite", "left"), ("task", "left"), ("checkpoint", "left"), ("successes", "right"),
                            ("rate", "right"), ("95% Wilson", "right"), ("threshold", "right"),
                            ("verdict", "center"), ("mean steps", "right"), ("errors", "right"),
                            *((h, "right") for h in action_headers), ("failures by stop", "left"),
                            ("wall", "right")):
        table.add_column(column, justify=justify, no_wrap=True)
    for r in results:
        low, high = r.interval
        figures = r.episode_figures
        demo = demonstrations.get((r.suite, r.task_index))
        table.add_row(r.suite, r.task_id, r.checkpoint, f"{r.successes}/{r.episodes}", f"{r.rate:.1%}",
                      f"[{low:.1%}, {high:.1%}]", describe_threshold(r.threshold), verdict_text(r.passed),
                      "-" if r.mean_steps is None else f"{r.mean_steps:.1f}", str(r.errors),
                      *(_figure_cell(figures.actions if figures else None, demo, field, fmt)
                        for _, field, fmt in _ACTION_COLUMNS),
                      figures.describe_stops() if figures else "-",
                      f"{r.wall_s:.0f} s" + (f" ({r.resumed} resumed)" if r.resumed else ""))
    return table


def closed_loop_summary(results: Iterable[TaskResult], registry=None, data_overrides: Mapping[str, str] | None = None,
                        title: str = "vla-bench: closed-loop success") -> tuple[Table, list[str]]:
    """The task table with the demonstrations' figures that the checkpoints file (`registry`, when there is one)
    points to, and notes on demonstration files that could not be read: the pytest summary, `vla-bench run` and
    `vla-bench report` all print this."""
    results = list(results)
    demonstrations, notes = {}, []
    if registry is not None:
        from .demonstrations import task_demonstration_figures

        demonstrations, notes = task_demonstration_figures(registry, results, data_overrides)
    return task_table(results, title, demonstrations), notes


def _figure_cell(figures: ActionFigures | None, demo: ActionFigures | None, field: str, fmt: str) -> str:
    cell = "-" if figures is None else fmt.format(getattr(figures, field))
    return cell if demo is None else f"{cell} ({fmt.format(getattr(demo, field))})"


def proxy_table(results: dict, title: str = "vla-bench: open-loop proxy metrics") -> Table:
    """results: {(checkpoint, suite): OpenLoopResult}; one row per metric, gated metrics first."""
    table = Table(title=title, title_justify="left")
    for column in ("suite", "checkpoint", "metric", "value", "95% bootstrap", "threshold", "verdict", "episodes",
                   "frames", "ground truth"):
        table.add_column(column, justify="left" if column in ("suite", "checkpoint", "metric") else "right",
                         no_wrap=True)
    for (checkpoint, suite), result in results.items():
        figures = sorted(result.figures.values(), key=lambda f: f.threshold is None)
        for f in figures:
            low, high = f.interval
            verdict = verdict_text(f.passed) + (" [yellow](!)[/]" if f.warning else "")
            table.add_row(suite, checkpoint, f.name, f"{f.value:.3f}", f"[{low:.3f}, {high:.3f}]",
                          describe_threshold(f.threshold), verdict, str(f.n_episodes),
                          str(f.n_frames), "-" if f.reference is None else f"{f.reference:.3f}")
    return table


def describe_task(result: TaskResult) -> str:
    """One task's figure as a sentence (the assertion message of a suite test, a line of `vla-bench run`)."""
    low, high = result.interval
    return (f"{result.suite} {result.task_id} {result.checkpoint}: {result.successes}/{result.episodes} "
            f"= {result.rate:.1%} (95% CI {low:.1%}-{high:.1%}), threshold {describe_threshold(result.threshold)}"
            + (f", {result.errors} episode(s) ended in errors (first: {result.first_error.strip().splitlines()[-1]})"
               if result.errors else ""))


def describe_gate(result: TaskResult) -> str:
    g = result.gate
    return (f"{result.suite} {result.task_id} {result.checkpoint}: gate {g.verdict.upper()}: "
            f"{g.candidate_rate:.1%} vs baseline {g.baseline_rate:.1%}, difference {g.difference:+.1%} "
            f"(95% CI {g.difference_low:+.1%} to {g.difference_high:+.1%}), p = {g.pvalue:.4f} ({g.test})")


def describe_scene_mismatch(result: TaskResult) -> str:
    shown = "; ".join(result.scene_mismatches[:3]) + ("; ..." if len(result.scene_mismatches) > 3 else "")
    return (f"{result.suite} {result.task_id} {result.checkpoint}: {len(result.scene_mismatches)} episode(s) "
            f"started from a scene that differs from the reference simulator stack ({shown}); its scores are "
            f"not comparable with published ones: run `vla-bench doctor` and see the README's validated stacks")


def describe_robustness(result) -> str:
    """A robustness case (a RobustnessResult) as a sentence: the perturbed task's figure, then the drop."""
    d = result.drop
    return (describe_task(result.perturbed)
            + f"; unperturbed {result.base.successes}/{result.base.episodes}, drop {d.drop:+.1%} "
              f"(95% CI {d.low:+.1%} to {d.high:+.1%}, {'paired' if d.paired else 'unpaired'})")


def describe_figure(suite: str, checkpoint: str, figure) -> str:
    """One open-loop proxy figure as a sentence."""
    low, high = figure.interval
    return (f"{suite} {checkpoint} {figure.name} = {figure.value:.3f} (95% bootstrap CI {low:.3f}-{high:.3f}, "
            f"{figure.n_episodes} episodes), threshold {describe_threshold(figure.threshold)}"
            + (f"; {figure.error}" if figure.error else ""))


def robustness_table(results, title: str = "vla-bench: robustness (LIBERO-PRO)") -> Table:
    """Per (robustness suite, task, checkpoint): the unperturbed and perturbed rates of the same checkpoint and the
    drop between them with its 95% interval (paired by init state where the init states are the same)."""
    table = Table(title=title, title_justify="left")
    for column in ("family", "suite", "task", "checkpoint", "unperturbed", "perturbed", "drop [95% CI]", "p (drop)",
                   "pairing", "threshold", "verdict"):
        table.add_column(column, justify="left" if column in ("family", "suite", "task", "checkpoint", "pairing")
                         else "right", no_wrap=True)
    for r in results:
        d = r.drop
        table.add_row(r.family, r.base_suite, r.task_id, r.checkpoint,
                      f"{r.base.rate:.1%} ({r.base.successes}/{r.base.episodes})",
                      f"{r.perturbed.rate:.1%} ({r.perturbed.successes}/{r.perturbed.episodes})",
                      f"{d.drop:+.1%} [{d.low:+.1%}, {d.high:+.1%}]", f"{d.pvalue:.4f}",
                      "paired" if d.paired else "unpaired", describe_threshold(r.perturbed.threshold),
                      verdict_text(r.passed))
    return table


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def gate_table(results: Iterable[TaskResult], suite_verdicts=(), title: str = "vla-bench: regression gate") -> Table:
    """Per task (and per suite): baseline and candidate rates, the difference with its 95% interval, p-value
    (raw, and Holm-adjusted within the suite), verdict, the smallest drop this many episodes could detect, and the
    episodes curtailment saved."""
    table = Table(title=title, title_justify="left")
    for column in ("suite", "task", "checkpoint", "baseline", "candidate", "difference [95% CI]", "p", "p (Holm)",
                   "verdict", "detectable drop", "saved", "test"):
        table.add_column(column, justify="left" if column in ("suite", "task", "checkpoint", "test") else "right",
                         no_wrap=True)
    holm = {(c, s, t.task): t.adjusted_pvalue for c, s, v in suite_verdicts for t in v.tasks}
    colours = {"pass": "green", "fail": "red", "inconclusive": "yellow"}

    def row(suite, task, checkpoint, g, adjusted, saved):
        table.add_row(suite, task, checkpoint, f"{g.baseline_rate:.1%} ({g.baseline_episodes})",
                      f"{g.candidate_rate:.1%} ({g.candidate_episodes})",
                      f"{g.difference:+.1%} [{g.difference_low:+.1%}, {g.difference_high:+.1%}]", f"{g.pvalue:.4f}",
                      "-" if adjusted is None else f"{adjusted:.4f}",
                      f"[{colours[g.verdict]}]{g.verdict.upper()}[/]", _pct(g.detectable_drop), saved, g.test)

    for r in results:
        if r.gate is not None:
            row(r.suite, r.task_id, r.checkpoint, r.gate, holm.get((r.checkpoint, r.suite, r.task_id)), str(r.saved))
    for checkpoint, suite, v in suite_verdicts:
        row(suite, "all tasks", checkpoint, v, None, "")
    return table


def results_from_records(records: list[EpisodeRecord]) -> list[TaskResult]:
    """Group stored episodes by (checkpoint, identity, suite, task, protocol) into table rows."""
    groups: dict[tuple, list[EpisodeRecord]] = {}
    for r in records:
        groups.setdefault((r.checkpoint, r.identity, r.suite, r.task_index, r.protocol_key), []).append(r)
    return [summarize(rows, key[0], key[2], key[3]) for key, rows in sorted(groups.items())]


def print_table(table: Table, console: Console | None = None) -> None:
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or logged: rich would assume 80 columns and cut every cell
            console = Console(width=220)
    console.print(table)
