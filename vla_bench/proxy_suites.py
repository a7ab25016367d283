"""The open-loop proxy suites: which dataset each reads, and the store of their figures.

`bridge_v2` reads Bridge V2 in the released RLDS layout; `libero_demos` reads LIBERO HDF5 demonstrations (the
released ones or the scripted expert's from `vla-bench collect`). Their paths come from checkpoints.toml's
[datasets.SUITE] tables or a --vla-data SUITE=PATH override.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .errors import VlaBenchError
from .proxy import OpenLoopResult, OpenLoopSource, bridge_source, libero_source
from .suites import OPEN_LOOP, get_suite


def open_loop_source(suite: str, dataset: dict) -> OpenLoopSource:
    """The episodes of an open-loop suite, read by its record's data source from the [datasets.SUITE] table."""
    data_source = get_suite(suite, OPEN_LOOP).data_source
    path = Path(dataset["path"])
    if not path.exists():
        raise VlaBenchError(f"dataset of {suite} not found at {path}: set [datasets.{suite}] path in "
                            f"checkpoints.toml or pass --vla-data {suite}=PATH")
    max_episodes = dataset.get("max_episodes")
    if data_source == "bridge_rlds":
        return bridge_source(path, dataset.get("split", "val"), ground_truth=dataset.get("ground_truth", "openvla"),
                             max_episodes=max_episodes)
    files = sorted(path.glob("*.hdf5")) if path.is_dir() else [path]  # "libero_hdf5"
    if not files:
        raise VlaBenchError(f"{path}: no *.hdf5 demonstration files (vla-bench collect writes them)")
    return libero_source(files, max_episodes=max_episodes)


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
    return {m: {"value": v, "ci": [lo, hi], "episodes": n, "frames": f} for m, v, lo, hi, n, f in rows}


def store_figures(db, checkpoint: str, identity: str, suite: str, result: OpenLoopResult, versions: dict) -> None:
    """One row per metric, with its per-episode values, so a paired comparison needs no re-run."""
    db.executescript(PROXY_SCHEMA)
    for name, fig in result.figures.items():
        per_episode = [] if fig.per_episode is None else [None if v != v else float(v) for v in fig.per_episode]
        db.execute("INSERT OR REPLACE INTO proxy_figures VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                   (checkpoint, identity, suite, result.source, name, float(fig.value), float(fig.interval[0]),
                    float(fig.interval[1]), fig.n_episodes, fig.n_frames, json.dumps(per_episode),
                    json.dumps(versions, sort_keys=True), time.time()))
