"""Merging results stores that were written apart (one per host, or per CI job) into one set of episode rows.

An episode is identified as the store's resume key is: (identity, suite, task, protocol key, init index). When
several stores hold it, one row is kept: the first measured (error-free) row in the order the stores were given,
else the first row. Measured rows that disagree on the outcome (seed, success, steps) are reported with the store
each came from, so a difference between hosts' simulator stacks is seen rather than silently averaged away.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from .results import EPISODE_KEY, EpisodeRecord


@dataclasses.dataclass(frozen=True)
class Disagreement:
    record: EpisodeRecord  # the row kept
    kept_from: str
    others: tuple[tuple[str, EpisodeRecord], ...]  # (store, row) of each measured row that says otherwise

    def describe(self) -> str:
        r = self.record
        said = "; ".join(f"{store} says {_outcome(other)}" for store, other in self.others)
        return (f"{r.suite} task{r.task_index + 1} {r.checkpoint} init {r.init_index}: {self.kept_from} says "
                f"{_outcome(r)}, {said}; kept {self.kept_from}'s (the first --results that measured it)")


def _outcome(r: EpisodeRecord) -> str:
    return f"{'success' if r.success else 'failure'} in {r.steps} steps (seed {r.seed})"


def episode_key(r: EpisodeRecord) -> tuple:
    return tuple(getattr(r, column) for column in EPISODE_KEY)


def merge_records(sources: Sequence[tuple[str, list[EpisodeRecord]]]) \
        -> tuple[list[EpisodeRecord], list[Disagreement]]:
    """sources: (store name, its rows), in precedence order. Returns one row per episode key, ordered as a store
    lists them, and the keys whose measured rows disagree."""
    by_key: dict[tuple, list[tuple[str, EpisodeRecord]]] = {}
    for name, records in sources:
        for record in records:
            by_key.setdefault(episode_key(record), []).append((name, record))
    merged, disagreements = [], []
    for rows in by_key.values():
        measured = [(name, r) for name, r in rows if r.error is None]
        kept_from, kept = (measured or rows)[0]
        merged.append(kept)
        others = tuple((name, r) for name, r in measured[1:]
                       if (r.seed, r.success, r.steps) != (kept.seed, kept.success, kept.steps))
        if others:
            disagreements.append(Disagreement(kept, kept_from, others))
    merged.sort(key=lambda r: (r.checkpoint, r.suite, r.task_index, r.init_index))
    return merged, disagreements
