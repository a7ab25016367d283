"""What a new user's bad inputs give: one clear message naming what to fix, and a non-zero exit, never a traceback.

SEEN is the README's "Bad input" table (case -> the words you see); every case below asserts its words, and
`test_readme_table_is_this_table` keeps the README's copy the same.
"""
import re
import sqlite3

import numpy as np
import pytest

from tests.conftest import REPO
from vla_bench.errors import VlaBenchError

pytest_plugins = ["pytester"]

SEEN = {
    "a threshold above 1 (`default = 1.5`)": "threshold 1.5 is outside [0, 1]",
    "a `[low, high]` threshold with low above high": "has low above high",
    "`--vla-results` pointing at a text file": "not a vla-bench results store",
    "`--vla-results` pointing at a folder": "is a folder: --vla-results takes the path of an SQLite file",
    "`vla-bench report --results` on another program's SQLite file (left unchanged)":
        "not a vla-bench results store (no episodes table",
    "`--episodes 0`, `--episodes -3`, `--max-steps 0`": "must be at least 1",
    "`--episodes 51` (LIBERO has 50 init states per task)": "so at most --episodes 50",
    "`--vla-data nosuch=PATH`": "unknown suite 'nosuch'; suites that read a dataset: bridge_v2, libero_demos",
    "`pytest suites/libero_nosuch`": "no such suite; suites in",
    "`pytest suites/libero_spatial -k task99`": "no task task99 in the collected suites (libero_spatial: task1 ... task10)",
    "a policy returning NaN or Inf in closed loop (an error, counted apart)":
        "policy returned non-finite actions at step",
    "a policy returning actions of the wrong shape in closed loop": "policy returned actions of shape",
    "a policy returning actions beyond 2 (LIBERO's range is [-1, 1])": "outside the action space at step",
    "a policy returning NaN in an open-loop suite (its metrics fail)": "the policy returned non-finite actions on",
    "a `vla_bench_checkpoint_kinds()` returning something else than {kind: module}":
        "vla_bench_checkpoint_kinds() must return {kind name: module path}",
}

NOOP = 'default = "noop"\n[checkpoints.noop]\nkind = "noop"\n'


@pytest.fixture
def noop_file(tmp_path):
    """A checkpoints.toml of one `noop` entry (the tests do not depend on the shipped file's entries)."""
    path = tmp_path / "checkpoints.toml"
    path.write_text(NOOP)
    return str(path)


def usage_error(result, case: str) -> str:
    """The run stopped with one usage error carrying SEEN[case], before any test ran."""
    output = result.stdout + result.stderr
    assert result.returncode == 4, output[-3000:]
    assert SEEN[case] in output, output[-3000:]
    assert "Traceback" not in output and " passed" not in output and " failed" not in output, output[-3000:]
    return output


# ---------------------------------------------------------------------------------------------- checkpoints.toml


@pytest.mark.parametrize("value, case", [("1.5", "a threshold above 1 (`default = 1.5`)"),
                                         ("[0.8, 0.2]", "a `[low, high]` threshold with low above high")])
def test_out_of_range_thresholds_are_refused_naming_the_file_and_key(checkpoints_file, capsys, value, case):
    from vla_bench.cli import main

    path = checkpoints_file(f"{NOOP}[thresholds.libero_spatial]\ndefault = {value}\n")
    assert main(["checkpoints", "--checkpoints-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert SEEN[case] in err and str(path) in err and "libero_spatial default" in err


def test_thresholds_at_the_ends_of_the_range_are_accepted(checkpoints_file):
    from vla_bench.registry import Registry

    Registry.load(checkpoints_file(f"{NOOP}[thresholds.libero_spatial]\ndefault = 1\ntask2 = 0\ntask3 = [0.2, 0.2]\n"))


# ---------------------------------------------------------------------------------------------- results store


def test_a_text_file_as_results_store_is_named(tmp_path):
    from vla_bench.results import ResultsStore

    path = tmp_path / "notes.txt"
    path.write_text("not a database, just notes\n" * 100)
    with pytest.raises(VlaBenchError, match=re.escape(SEEN["`--vla-results` pointing at a text file"])) as info:
        ResultsStore(path)
    assert str(path) in str(info.value)
    assert path.read_text() == "not a database, just notes\n" * 100


def test_a_folder_as_results_store_is_one_usage_error(project, tmp_path, noop_file):
    result = project.run("suites/libero_spatial", "-k", "task1", "--checkpoints-file", noop_file,
                         "--vla-results", str(tmp_path))
    assert str(tmp_path) in usage_error(result, "`--vla-results` pointing at a folder")


def test_report_opens_read_only_and_refuses_a_foreign_sqlite_file(tmp_path, capsys):
    from vla_bench.cli import main

    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
        db.execute("INSERT INTO notes VALUES ('mine')")
    before = path.read_bytes()
    assert main(["report", "--results", str(path)]) == 2
    err = capsys.readouterr().err
    assert SEEN["`vla-bench report --results` on another program's SQLite file (left unchanged)"] in err
    assert str(path) in err
    assert path.read_bytes() == before  # no episodes table added, not switched to WAL
    assert not (tmp_path / "other.db-wal").exists()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_report_reads_a_store_it_cannot_write(tmp_path, capsys):
    from vla_bench.cli import main
    from vla_bench.results import EpisodeRecord, ResultsStore

    path = tmp_path / "r.sqlite"
    store = ResultsStore(path)
    store.add(EpisodeRecord("noop", "id", "libero_spatial", 0, "t", 0, 1, "k", {}, False, 5, None, 0.1, {}, "egl", "cpu"))
    store.close()
    assert main(["report", "--results", str(path), "--checkpoints-file", str(tmp_path / "none.toml")]) == 0
    assert "0/1" in capsys.readouterr().out


def test_the_pytest_run_refuses_a_foreign_sqlite_file_and_leaves_it_alone(project, tmp_path, noop_file):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
    before = path.read_bytes()
    result = project.run("suites/libero_spatial", "-k", "task1", "--checkpoints-file", noop_file,
                         "--vla-results", str(path))
    output = result.stdout + result.stderr
    assert result.returncode == 4 and "not a vla-bench results store" in output and str(path) in output, output
    assert path.read_bytes() == before


# ---------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("option, value", [("--episodes", "0"), ("--episodes", "-3"), ("--max-steps", "0")])
def test_episode_counts_below_one_are_one_usage_error_before_collection(project, noop_file, option, value):
    result = project.run("suites/libero_spatial", option, value, "--checkpoints-file", noop_file)
    output = usage_error(result, "`--episodes 0`, `--episodes -3`, `--max-steps 0`")
    assert f"{option} must be at least 1, got {value}" in output
    assert "collected" not in output


def test_more_episodes_than_init_states_is_refused_naming_the_maximum(project, noop_file):
    result = project.run("suites/libero_spatial", "-k", "task1", "--episodes", "51", "--checkpoints-file", noop_file)
    output = usage_error(result, "`--episodes 51` (LIBERO has 50 init states per task)")
    assert "libero_spatial has 50 init states per task" in output


def test_an_unknown_suite_in_vla_data_is_refused(project):
    result = project.run("suites/bridge_v2", "--vla-data", "nosuch=/tmp/x", "--collect-only")
    usage_error(result, "`--vla-data nosuch=PATH`")


def test_a_missing_suite_folder_lists_the_suites(project, noop_file):
    result = project.run("suites/libero_nosuch", "--checkpoints-file", noop_file)
    output = usage_error(result, "`pytest suites/libero_nosuch`")
    assert "libero_spatial" in output and "bridge_v2" in output


def test_a_task_beyond_the_suite_lists_the_task_range(project, noop_file):
    result = project.run("suites/libero_spatial", "-k", "task99", "--checkpoints-file", noop_file)
    usage_error(result, "`pytest suites/libero_spatial -k task99`")


def test_a_task_word_inside_the_range_still_selects_as_before(project, noop_file):
    result = project.run("suites/libero_spatial", "-k", "task3 or task99", "--checkpoints-file", noop_file,
                         "--collect-only", "-q")
    assert result.returncode == 0 and "test_task[task3-noop]" in result.stdout, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------- README


def test_readme_table_is_this_table():
    """Every row of the README's bad-input table is a case here with the same words, and the other way round."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Bad input"):]
    section = section[:section.index("\n#", 1)]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| ") else []
        if len(cells) == 2 and cells[0] not in ("You do", "---"):
            rows[cells[0]] = cells[1]
    assert set(rows) == set(SEEN)
    for case, words in SEEN.items():
        assert f"`{words}`" in rows[case].replace("\\|", "|"), case
