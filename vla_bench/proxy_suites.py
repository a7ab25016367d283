"""The open-loop proxy suites: which dataset each reads, and the store of their figures.

`bridge_v2` reads Bridge V2 in the released RLDS layout; `libero_demos` reads LIBERO HDF5 demonstrations (the
released ones or the scripted expert's from `vla-bench collect`). Their paths come from checkpoints.toml's
[datasets.SUITE] tables or a --vla-data SUITE=PATH override.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from .errors import VlaBenchError, choices
from .proxy import OpenLoopResult, OpenLoopSource, bridge_source, libero_source

PROXY_SUITES = ("bridge_v2", "libero_demos")


def open_loop_source(suite: str, dataset: dict) -> OpenLoopSource:
    path = Path(dataset["path"])
    if not path.exists():
        raise VlaBenchError(f"dataset of {suite} not found at {path}: set [datasets.{suite}] path in "
                            f"checkpoints.toml or pass --vla-data {suite}=PATH")
    max_episodes = dataset.get("max_episodes")
    if suite == "bridge_v2":
        return bridge_source(path, dataset.get("split", "val"), ground_truth=dataset.get("ground_truth", "openvla"),
                             max_episodes=max_episodes)
    if suite == "libero_demos":
        files = sorted(path.glob("*.hdf5")) if path.is_dir() else [path]
        if not files:
            raise VlaBenchError(f"{path}: no *.hdf5 demonstration files (vla-bench collect writes them)")
        return libero_source(files, max_episodes=max_episodes)
    raise VlaBenchError(f"unknown open-loop suite {suite!r}; valid: {choices(PROXY_SUITES)}")


PROXY_SCHEMA = """
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


def load_figures(db, checkpoint: str, suite: str) -> dict[str, dict]:
    """The stored figures of a checkpoint on an open-loop suite: {metric: {value, ci, episodes, frames}} (empty when
    none are stored)."""
    db.executescript(PROXY_SCHEMA)
    rows = db.execute("SELECT metric, value, low, high, n_episodes, n_frames FROM proxy_figures "
                      "WHERE checkpoint = ? AND suite = ?", (checkpoint, suite)).fetchall()
    return {m: {"value": float(v), "ci": [float(lo), float(hi)], "episodes": n, "frames": f}
            for m, v, lo, hi, n, f in rows}


def _real(x: float) -> float | str:
    """SQLite turns a NaN into NULL (and the REAL NOT NULL columns refuse it): non-finite figures are stored as the
    text 'nan' / 'inf' / '-inf', which float() reads back."""
    x = float(x)
    return x if math.isfinite(x) else str(x)


def store_figures(db, checkpoint: str, identity: str, suite: str, result: OpenLoopResult, versions: dict) -> None:
    """One row per metric, with its per-episode values, so a paired comparison needs no re-run."""
    db.executescript(PROXY_SCHEMA)
    db.execute("BEGIN")  # all of a result's figures or none: a failure leaves no half-written result behind
    try:
        for name, fig in result.figures.items():
            per_episode = [] if fig.per_episode is None else [None if v != v else float(v) for v in fig.per_episode]
            db.execute("INSERT OR REPLACE INTO proxy_figures VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                       (checkpoint, identity, suite, result.source, name, _real(fig.value), _real(fig.interval[0]),
                        _real(fig.interval[1]), fig.n_episodes, fig.n_frames, json.dumps(per_episode),
                        json.dumps(versions, sort_keys=True), time.time()))
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
