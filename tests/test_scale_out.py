"""Scaling out: several processes writing one results store, stores of several hosts merged by `vla-bench report`,
and suites under pytest-xdist (`pytest -n N`: every xdist worker is a session of its own, the controller prints the
one summary, gates and saves baselines from what the workers measured)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.test_fault_injection import episode_rows
from vla_bench.results import EpisodeRecord, ResultsStore

# ---------------------------------------------------------------------------------------------- concurrent writers

WRITER = """
import sys, time
import vla_bench.results as results
from vla_bench.results import EpisodeRecord, ResultsStore

path, writer, rows, start = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
results.BUSY_TIMEOUT_S = 0.02  # far below how long the locker holds the store: only the retries get rows in
time.sleep(max(0.0, start - time.time()))  # every writer opens the store at the same moment
store = ResultsStore(path)
for i in range(rows):
    store.add(EpisodeRecord("ckpt", "ident", "libero_spatial", writer, "t", i, 1000 * writer + i, "key", {"p": 1},
                            i % 3 == 0, i, None, 0.5, {"v": 1}, "egl", "cpu"))
"""

LOCKER = """
import sqlite3, sys, time
path, start = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
db = sqlite3.connect(path, isolation_level=None, timeout=30)
for _ in range(4):  # holds the write lock for 0.4 s at a time, 4 times, while the writers write
    db.execute("BEGIN IMMEDIATE")
    time.sleep(0.4)
    db.execute("COMMIT")
    time.sleep(0.05)
"""

OLD_SCHEMA = """CREATE TABLE episodes (checkpoint TEXT NOT NULL, identity TEXT NOT NULL, suite TEXT NOT NULL,
    task_index INTEGER NOT NULL, task_name TEXT NOT NULL, init_index INTEGER NOT NULL, seed INTEGER NOT NULL,
    protocol_key TEXT NOT NULL, protocol TEXT NOT NULL, success INTEGER NOT NULL, steps INTEGER NOT NULL, error TEXT,
    wall_s REAL NOT NULL, versions TEXT NOT NULL, render_backend TEXT NOT NULL, device TEXT NOT NULL, video TEXT,
    created REAL NOT NULL, PRIMARY KEY (identity, suite, task_index, protocol_key, init_index))"""


def test_writers_in_several_processes_commit_every_row_while_the_store_is_held_locked(tmp_path):
    """Four processes open one store at the same moment (a store written before the scene_check column, so each
    tries to add it) and commit 30 rows each, while a fifth holds the write lock well beyond their busy timeout:
    every process succeeds, every row is there exactly once, and the file passes SQLite's integrity check."""
    path = tmp_path / "shared.sqlite"
    with sqlite3.connect(path) as db:
        db.execute(OLD_SCHEMA)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.time() + 1.5  # after every interpreter has started
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(w), "30", str(start)], env=env,
                              stderr=subprocess.PIPE) for w in range(4)]
    procs.append(subprocess.Popen([sys.executable, "-c", LOCKER, str(path), str(start)], stderr=subprocess.PIPE))
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()[-2000:]
        proc.stderr.close()
    store = ResultsStore(path)
    rows = store.episodes()
    assert sorted((r.task_index, r.init_index) for r in rows) == [(w, i) for w in range(4) for i in range(30)]
    assert all(r.seed == 1000 * r.task_index + r.init_index and r.success == (r.init_index % 3 == 0) for r in rows)
    assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_add_missing_keeps_the_rows_a_store_has_and_adds_the_others(tmp_path):
    store = ResultsStore(tmp_path / "r.sqlite")
    mine = _record(init_index=0, success=True, steps=40)
    store.add(mine)
    theirs = [_record(init_index=0, success=False, steps=220), _record(init_index=1, success=True, steps=50)]
    assert store.add_missing(theirs) == 1
    assert [(r.init_index, r.success, r.steps) for r in store.episodes()] == [(0, True, 40), (1, True, 50)]
    assert store.add_missing([]) == 0


def _record(**changes) -> EpisodeRecord:
    values = dict(checkpoint="expert", identity="id-expert", suite="libero_spatial", task_index=0, task_name="t",
                  init_index=0, seed=7, protocol_key="k1", protocol={"episodes": 2}, success=True, steps=60,
                  error=None, wall_s=1.0, versions={}, render_backend="egl", device="cpu")
    values.update(changes)
    return EpisodeRecord(**values)


# ---------------------------------------------------------------------------------------------- report merging


def test_report_merges_stores_of_two_hosts_and_names_the_store_it_kept_a_disagreeing_episode_from(tmp_path, capsys):
    """Host A measured init states 0, 2, 3 of task 1 and errored on 1; host B measured 1-4 and task 2's init 0. The
    merged table counts each episode once: B's measured init 1 over A's error, the first store's row where both
    measured, and the one disagreement (init 2) is named with the store it was kept from."""
    from vla_bench.cli import main

    a, b = ResultsStore(tmp_path / "a.sqlite"), ResultsStore(tmp_path / "b.sqlite")
    for i in (0, 2, 3):
        a.add(_record(init_index=i, success=True, steps=50 + i))
    a.add(_record(init_index=1, success=False, steps=3, error="MujocoException: unstable"))
    b.add(_record(init_index=1, success=True, steps=61))
    b.add(_record(init_index=2, success=False, steps=220))  # disagrees with A's init 2
    b.add(_record(init_index=3, success=True, steps=53))  # agrees with A's init 3
    b.add(_record(init_index=4, success=False, steps=220))
    b.add(_record(task_index=1, task_name="t2", init_index=0, success=True, steps=70))
    for store in (a, b):
        store.close()
    toml = tmp_path / "checkpoints.toml"
    toml.write_text('[checkpoints.expert]\nkind = "scripted"\n')

    assert main(["report", "--results", str(tmp_path / "a.sqlite"), "--results", str(tmp_path / "b.sqlite"),
                 "--checkpoints-file", str(toml)]) == 0
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if "libero_spatial" in line]
    # task 1: init 0..4 once each; A's measured init 2 (success) kept over B's; B's measured init 1 over A's error
    assert "task1" in lines[0] and "4/5" in lines[0] and "│      0 │" in lines[0]
    assert "task2" in lines[1] and "1/1" in lines[1]
    assert "1 episode(s) measured in more than one store with different outcomes" in err
    assert (f"libero_spatial task1 expert init 2: {tmp_path / 'a.sqlite'} says success in 52 steps (seed 7), "
            f"{tmp_path / 'b.sqlite'} says failure in 220 steps (seed 7); kept {tmp_path / 'a.sqlite'}'s") in err

    # the other order: B's row wins, and the table says so
    assert main(["report", "--results", str(tmp_path / "b.sqlite"), "--results", str(tmp_path / "a.sqlite"),
                 "--checkpoints-file", str(toml)]) == 0
    out, err = capsys.readouterr()
    assert "3/5" in [line for line in out.splitlines() if "task1" in line][0]
    assert f"kept {tmp_path / 'b.sqlite'}'s" in err

    assert main(["report", "--results", str(tmp_path / "a.sqlite"), "--results", str(tmp_path / "none.sqlite")]) == 2
    assert f"{tmp_path / 'none.sqlite'}: no results store here" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- pytest -n N

SCALE_TOML = ('default = "random"\n[checkpoints.random]\nkind = "random"\n'
              '[thresholds.libero_spatial]\ndefault = 0.0\n')
#: two short episodes of the seeded random control on two tasks: cheap, and every row has its own seed
COMMON = ["suites/libero_spatial", "-k", "task1 or task2", "--episodes", "2", "--max-steps", "5"]


@pytest.mark.sim
def test_xdist_gives_the_rows_summary_gate_and_saved_baseline_of_one_process_with_a_store_per_host(project, tmp_path):
    """`pytest -n 0` saves a baseline; then two xdist workers, one of them in another folder as a second host's
    worker is (a popen gateway behind a proxy with its own working directory: the multi-host recipe of the README,
    on one machine), gate against it and save their own. The controller's store ends with exactly the one-process
    run's rows, the other host's store with the rows measured there; the controller prints one summary with both
    tasks and the suite gate, and saves the same outcomes the one-process run saved."""
    toml = project.checkpoints(SCALE_TOML)
    host_b = tmp_path / "host_b"
    # the same checkout on each host: test ids are relative to its root (the folder of its pytest.ini)
    (project.path / "pytest.ini").write_text("[pytest]\n")
    shutil.copytree(project.path / "suites", host_b / "suites")
    shutil.copy(project.path / "pytest.ini", host_b)
    common = [*COMMON, "--checkpoints-file", str(toml), "--vla-baselines", str(tmp_path / "b"),
              "--vla-results", "r.sqlite"]

    one = project.run(*common, "-n", "0", "--vla-workers", "1", "--vla-save", "base0")
    assert one.returncode == 0, one.stdout[-3000:]
    reference = episode_rows(project.path / "r.sqlite")
    assert [r[1:3] for r in reference] == [(0, 0), (0, 1), (1, 0), (1, 1)] and len({r[3] for r in reference}) == 4
    (project.path / "r.sqlite").rename(tmp_path / "one.sqlite")

    many = project.run(*common, "--px", f"id=host_b//popen//chdir={host_b}//python={sys.executable}",
                       "--tx", "popen//via=host_b", "--tx", "popen", "--dist", "load",
                       "--vla-compare", "base0", "--vla-save", "base2", "-rA")
    assert many.returncode == 0, many.stdout[-3000:] + many.stderr[-3000:]
    assert "created: 2/2 workers" in many.stdout and "2 passed" in many.stdout
    assert episode_rows(project.path / "r.sqlite") == reference
    # the other host's own store: the task its worker measured (xdist deals two tests to two workers one each),
    # which reached the controller's store only through the worker's report
    host_rows = episode_rows(host_b / "r.sqlite")
    assert len(host_rows) == 2 and len({r[1] for r in host_rows}) == 1 and set(host_rows) <= set(reference)

    summary = many.stdout[many.stdout.index("vla-bench: closed-loop success"):]
    assert many.stdout.count("vla-bench: closed-loop success") == 1
    task_lines = [line for line in summary.splitlines() if line.startswith("│ libero_spatial")]
    assert [line.split("│")[2].strip() for line in task_lines[:2]] == ["task1", "task2"]
    assert all("0/2" in line for line in task_lines[:2])
    assert "vla-bench: regression gate" in summary and "all tasks" in summary
    assert "baseline saved: " in summary and many.stdout.count("baseline saved: ") == 1
    saved = [json.loads((tmp_path / "b" / f"{name}.json").read_text()) for name in ("base0", "base2")]
    assert saved[0]["tasks"] == saved[1]["tasks"] == {f"task{t}": {"0": False, "1": False} for t in (1, 2)}
    assert saved[0]["checkpoint"] == saved[1]["checkpoint"] and saved[0]["protocol"] == saved[1]["protocol"]


@pytest.mark.sim
def test_a_killed_xdist_session_resumes_with_no_episode_lost_or_run_twice(project, tmp_path):
    """SIGKILL the whole `pytest -n 2` process group (controller, xdist workers, simulator workers: what a CI job's
    cancellation does) once its first episode is committed, then run it again: every planned episode of both tasks
    is in the store exactly once, measured (no error rows), with its protocol seed, and the rerun resumed the rows
    the killed run had committed."""
    from tests.conftest import sim_env
    from vla_bench.protocol import reference_protocol

    toml = project.checkpoints(SCALE_TOML)
    db = project.path / "r.sqlite"
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *COMMON, "--checkpoints-file",
               str(toml), "--vla-results", str(db), "-n", "2"]
    proc = subprocess.Popen(command, cwd=project.path, env=sim_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not _rows_in(db):
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before its first episode was seen: " + proc.stderr.read().decode()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    before = episode_rows(db)
    assert 1 <= len(before) < 4 and len({r[1:3] for r in before}) == len(before)

    again = project.run(*COMMON, "--checkpoints-file", str(toml), "--vla-results", str(db), "-n", "2")
    assert again.returncode == 0, again.stdout[-3000:]
    protocol = reference_protocol("libero_spatial", episodes=2, max_steps=5)
    expected = [("random", t, i, protocol.episode_seed(t, i), 0, 5, None) for t in (0, 1) for i in (0, 1)]
    assert episode_rows(db) == expected
    assert set(before) <= set(expected)
    assert sum(int(n) for n in re.findall(r"\((\d+) resumed\)", again.stdout)) == len(before), again.stdout


def _rows_in(db) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as c:
            return c.execute("SELECT COUNT(*) FROM episodes").fetchone()[0]
    except sqlite3.Error:  # not created yet, or the schema is being written
        return 0


def test_workers_on_one_host_are_counted_by_the_host_their_gateway_runs_on():
    """Each xdist worker's default --vla-workers is its host's CPUs over the xdist workers on that host: popen
    workers share this host, `via` workers their proxy's host, ssh workers the host they name."""
    from execnet import XSpec

    from vla_bench.xdist_glue import workers_sharing_host

    specs = [XSpec(s) for s in ["popen", "popen", "popen//via=gpu2", "popen//via=gpu2", "popen//via=gpu2",
                                "ssh=me@gpu3//python=/srv/venv/bin/python", "popen//chdir=/scratch"]]
    assert [workers_sharing_host(specs, s) for s in specs] == [3, 3, 3, 3, 3, 1, 3]
