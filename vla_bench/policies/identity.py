"""Content identities of checkpoints: what a result row records so that a changed checkpoint is never confused
with the one that was measured."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable


def hash_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def hash_files(paths: Iterable[Path], extra: Any = None, chunk: int = 1 << 20) -> str:
    """sha256 over the files' names and bytes (in sorted order) and an optional JSON-able extra; 16 hex digits."""
    h = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        h.update(path.name.encode())
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]
