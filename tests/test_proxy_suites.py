"""suites/bridge_v2 as a user runs it, on the real debug shard: the controls' verdicts and the stored figures."""
import sqlite3

import pytest

from tests.conftest import run_pytest


def outcomes(stdout: str, word: str) -> set[str]:
    return {line.split("[")[1].split("]")[0] for line in stdout.splitlines()
            if line.startswith(word) and "test_metric[" in line}


def test_replay_passes_every_check_and_noop_fails_every_check(tmp_path):
    db = tmp_path / "r.sqlite"
    result = run_pytest("suites/bridge_v2", "--checkpoint", "replay", "--checkpoint", "noop", "-rA",
                        "--vla-results", str(db))
    metrics = {"sign_accuracy", "correlation", "gripper_accuracy", "diversity", "success_proxy_rate"}
    assert outcomes(result.stdout, "PASSED") == {f"{m}-replay" for m in metrics}, result.stdout[-3000:]
    assert outcomes(result.stdout, "FAILED") == {f"{m}-noop" for m in metrics}
    from vla_bench.proxy_suites import load_figures

    with sqlite3.connect(db) as c:
        rows = {m: f["episodes"] for m, f in load_figures(c, "replay", "bridge_v2").items()}
        noop = load_figures(c, "noop", "bridge_v2")
        assert load_figures(c, "replay", "libero_demos") == {}
    assert metrics <= set(rows) and set(rows.values()) == {25}
    assert set(noop) == set(rows) and all(f["episodes"] == 25 and f["frames"] > 0 for f in noop.values())


def test_default_checkpoints_of_the_suite_come_from_its_dataset_table():
    result = run_pytest("suites/bridge_v2", "--collect-only", "-q")
    assert "test_metric[sign_accuracy-replay]" in result.stdout and "-expert]" not in result.stdout


def test_a_missing_dataset_names_the_path_and_how_to_set_it(tmp_path):
    result = run_pytest("suites/bridge_v2", "-k", "sign_accuracy", "--vla-data", f"bridge_v2={tmp_path}/nope",
                        "--vla-results", str(tmp_path / "r.sqlite"))
    assert result.returncode == 1
    assert f"dataset of bridge_v2 not found at {tmp_path}/nope" in result.stdout
    assert "--vla-data bridge_v2=PATH" in result.stdout
