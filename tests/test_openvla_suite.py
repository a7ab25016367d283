"""An `openvla` entry (a tiny snapshot in the published layout, and a LoRA adapter over it) evaluated the way a
user runs a suite: the run completes, records every episode, and the verdict is whatever the numbers say."""
import sqlite3

import pytest

from tests.conftest import BRIDGE_DEBUG

pytestmark = pytest.mark.sim


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    from vla_bench.openvla import tiny

    root = tmp_path_factory.mktemp("tiny-openvla")
    tokenizer = tiny.build_tokenizer(root / "tokenizer")
    snapshot = tiny.write_tiny_snapshot(root / "snapshot", tokenizer)
    tiny.write_tiny_adapter(snapshot, root / "adapter")
    toml = root / "checkpoints.toml"
    toml.write_text(f"""
default = "tiny"
[thresholds.libero_spatial]
default = 0.5
[checkpoints.tiny]
kind = "openvla"
source = "{snapshot}"
[checkpoints.tiny-lora]
kind = "openvla"
base = "tiny"
adapter = "{root / 'adapter'}"
[checkpoints.replay]
kind = "replay"
[datasets.bridge_v2]
path = "{BRIDGE_DEBUG}"
split = "train"
""")
    return toml


def test_tiny_openvla_and_its_adapter_run_a_libero_task_and_record_every_episode(project, tiny_checkpoints, tmp_path):
    db = tmp_path / "r.sqlite"
    result = project.run("suites/libero_spatial", "-k", "task1", "--checkpoints-file", str(tiny_checkpoints),
                         "--checkpoint", "tiny", "--checkpoint", "tiny-lora", "--episodes", "2", "--max-steps", "4",
                         "--vla-results", str(db), "-rA")
    # judged (passed or failed on its threshold), never errored
    assert result.returncode in (0, 1), result.stdout[-3000:]
    assert not [line for line in result.stdout.splitlines() if line.startswith("ERROR")], result.stdout[-3000:]
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT checkpoint, init_index, steps, error FROM episodes ORDER BY 1, 2").fetchall()
        identities = {r[0] for r in c.execute("SELECT DISTINCT identity FROM episodes")}
    assert rows == [("tiny", 0, 4, None), ("tiny", 1, 4, None), ("tiny-lora", 0, 4, None), ("tiny-lora", 1, 4, None)]
    assert len(identities) == 2  # the adapter entry has an identity of its own


def test_tiny_openvla_runs_the_bridge_proxy_suite(project, tiny_checkpoints, tmp_path):
    db = tmp_path / "r.sqlite"
    result = project.run("suites/bridge_v2", "--checkpoints-file", str(tiny_checkpoints), "--checkpoint", "tiny",
                         "--vla-results", str(db), "-rA")
    outcomes = [line for line in result.stdout.splitlines() if "test_metric[" in line
                and line.split()[0] in ("PASSED", "FAILED")]
    assert len(outcomes) == 5, result.stdout[-3000:]  # five gated metrics, judged, none errored
    # judged on measured figures: a failure for a missing dataset would also be a FAILED line
    from vla_bench.open_loop import GATED_METRICS
    from vla_bench.results import ResultsStore

    store = ResultsStore(db)
    figures = store.proxy_figures("tiny", "bridge_v2")
    store.close()
    assert set(GATED_METRICS) <= set(figures), result.stdout[-3000:]
    assert all(figures[m]["episodes"] == 25 and figures[m]["frames"] > 0 for m in GATED_METRICS)
