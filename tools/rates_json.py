"""Per-task success rates of a results store as JSON: python tools/rates_json.py RESULTS.sqlite OUT.json

{checkpoint: {suite: {task: {successes, episodes, errors, rate, ci_low, ci_high, threshold, passed}}}}, thresholds
from the checkpoints.toml of the working directory (None where it has no entry). Written atomically.
"""
import json
import os
import sys
import tempfile
from pathlib import Path

from vla_bench.errors import VlaBenchError
from vla_bench.registry import Registry, default_path
from vla_bench.report import results_from_records
from vla_bench.results import ResultsStore


def main(results: str, out: str) -> int:
    store = ResultsStore(Path(results))
    try:
        registry = Registry.load(default_path(Path.cwd()))
    except VlaBenchError:
        registry = None
    table: dict = {}
    for row in results_from_records(store.episodes()):
        if registry is not None and row.checkpoint in registry.checkpoints:
            row.threshold = registry.threshold(registry.checkpoints[row.checkpoint], row.suite, row.task_id)
        low, high = row.interval
        table.setdefault(row.checkpoint, {}).setdefault(row.suite, {})[row.task_id] = {
            "successes": row.successes, "episodes": row.episodes, "errors": row.errors, "rate": round(row.rate, 4),
            "ci_low": round(low, 4), "ci_high": round(high, 4),
            "threshold": list(row.threshold) if isinstance(row.threshold, tuple) else row.threshold,
            "passed": row.passed}
    for suites in table.values():  # task1, task2, ... task10 in numeric order
        for suite, tasks in suites.items():
            suites[suite] = dict(sorted(tasks.items(), key=lambda kv: int(kv[0][4:])))
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(out)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(table, f, indent=1)
    os.replace(tmp, out)
    for checkpoint, suites in table.items():
        for suite, tasks in suites.items():
            k = sum(t["successes"] for t in tasks.values())
            n = sum(t["episodes"] for t in tasks.values())
            below = [task for task, t in tasks.items() if t["passed"] is False]
            print(f"{checkpoint} {suite}: {k}/{n} = {k / max(n, 1):.1%}"
                  + (f"; below threshold: {', '.join(below)}" if below else ""))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.splitlines()[0])
    sys.exit(main(*sys.argv[1:]))
