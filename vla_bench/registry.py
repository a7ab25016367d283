"""checkpoints.toml -> validated CheckpointSpec objects; thresholds; identities; write-back with comments kept.

Layout of checkpoints.toml:

    default = "expert"                       # the entry used when no --checkpoint is given

    [thresholds.libero_spatial]              # suite-wide pass thresholds (success rate per task)
    default = 0.9
    task5 = 0.85                             # one task of that suite

    [checkpoints.expert]
    kind = "scripted"                        # which family: see vla_bench/policies/kinds.py
    baseline = "expert-main"                 # optional: the stored baseline its gate compares against
    [checkpoints.expert.thresholds.libero_spatial]
    default = 0.95                           # overrides the suite-wide threshold for this checkpoint

A threshold is a number (the measured figure must be >= it) or a [low, high] pair (it must lie inside); both are
read into the one Threshold type (vla_bench/thresholds.py).
Lookup order for (checkpoint, suite, case): checkpoint's case, checkpoint's suite default, file's case, file's
suite default, then the library default for that suite (proxy metrics), else an error naming what to add.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import tomlkit

from .errors import VlaBenchError, choices
from .policies.kinds import COMMON_KEYS, family_module
from .thresholds import Threshold


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    name: str
    kind: str
    options: Mapping[str, Any]  # the kind-specific keys, validated by the family module
    thresholds: Mapping[str, Mapping[str, Any]]
    baseline: str | None
    path: Path  # the checkpoints.toml that defines it: relative paths resolve against its folder

    def where(self, key: str | None = None) -> str:
        """'checkpoints.toml: [checkpoints.NAME] key: ' — the prefix of every error about this entry."""
        return f"{self.path}: [checkpoints.{self.name}]" + (f" {key}" if key else "") + ": "

    def resolve_path(self, value: str) -> Path:
        """A path from this entry, relative to the checkpoints.toml that holds it."""
        return resolve_relative(self.path, value)


class Registry:
    def __init__(self, path: Path, document: tomlkit.TOMLDocument):
        self.path = path
        self.document = document
        self.checkpoints: dict[str, CheckpointSpec] = {}
        self._parse()

    # ---- loading and validation -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "Registry":
        path = Path(path) if path is not None else default_path()
        if not path.is_file():
            raise VlaBenchError(f"{path}: no such checkpoints file (pass --checkpoints-file or create it)")
        try:
            doc = tomlkit.parse(path.read_text())
        except Exception as e:  # tomlkit's own parse errors carry line and column
            raise VlaBenchError(f"{path}: not valid TOML: {e}") from None
        return cls(path.resolve(), doc)

    def _parse(self) -> None:
        data = self.document.unwrap()
        unknown = set(data) - {"default", "thresholds", "checkpoints", "datasets"}
        if unknown:
            raise VlaBenchError(f"{self.path}: unknown top-level key(s) {choices(sorted(unknown))}; "
                                "valid: default, thresholds, checkpoints, datasets")
        self.datasets = data.get("datasets", {})
        if not isinstance(self.datasets, dict) or not all(isinstance(v, dict) and isinstance(v.get("path"), str)
                                                          for v in self.datasets.values()):
            raise VlaBenchError(f"{self.path}: [datasets.NAME] tables need a path = \"...\" key")
        entries = data.get("checkpoints", {})
        if not isinstance(entries, dict) or not entries:
            raise VlaBenchError(f"{self.path}: no [checkpoints.NAME] entries")
        self.suite_thresholds = _check_threshold_tables(data.get("thresholds", {}), f"{self.path}: [thresholds]")
        for name, table in entries.items():
            self.checkpoints[name] = self._spec(name, table)
        self.default = data.get("default")
        if self.default is None:
            raise VlaBenchError(f"{self.path}: missing top-level key 'default' (the entry used without --checkpoint); "
                                f"entries: {choices(self.checkpoints)}")
        if self.default not in self.checkpoints:
            raise VlaBenchError(f"{self.path}: default = {self.default!r} is not an entry; "
                                f"entries: {choices(self.checkpoints)}")
        for spec in self.checkpoints.values():
            validate = getattr(family_module(spec.kind), "validate", None)
            if validate:
                validate(spec, self)

    def _spec(self, name: str, table: Any) -> CheckpointSpec:
        where = f"{self.path}: [checkpoints.{name}]"
        if not isinstance(table, dict):
            raise VlaBenchError(f"{where}: must be a table")
        if "kind" not in table:
            raise VlaBenchError(f"{where}: missing key 'kind'")
        module = family_module(table["kind"], f"{where} kind: ")
        allowed = {**COMMON_KEYS, **module.KEYS}
        options = {}
        for key, value in table.items():
            if key not in allowed:
                raise VlaBenchError(f"{where}: unknown key {key!r} for kind {table['kind']!r}; "
                                    f"valid keys: {choices(sorted(allowed))}")
            expected = allowed[key]
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, expected) or (isinstance(value, bool) and expected in (int, float)):
                names = expected.__name__ if isinstance(expected, type) else " or ".join(t.__name__ for t in expected)
                raise VlaBenchError(f"{where} {key}: expected {names}, got {type(value).__name__} {value!r}")
            if key not in COMMON_KEYS:
                options[key] = value
        missing = [k for k in getattr(module, "REQUIRED", ()) if k not in table]
        if missing:
            raise VlaBenchError(f"{where}: missing key(s) {choices(missing)} required by kind {table['kind']!r}")
        thresholds = _check_threshold_tables(table.get("thresholds", {}), f"{where} thresholds")
        return CheckpointSpec(name=name, kind=table["kind"], options=options, thresholds=thresholds,
                              baseline=table.get("baseline"), path=self.path)

    # ---- queries ------------------------------------------------------------------------------------------------
    def get(self, name: str | None) -> CheckpointSpec:
        name = self.default if name is None else name
        if name not in self.checkpoints:
            raise VlaBenchError(f"unknown checkpoint {name!r} in {self.path}; valid: {choices(self.checkpoints)}")
        return self.checkpoints[name]

    def checkpoint_names(self, requested: list[str] | None, suite: str | None = None) -> list[str]:
        """The entries to evaluate: the --checkpoint names, else the suite's own defaults ([datasets.SUITE]
        checkpoints), else `default`; an unknown name raises an error listing the valid ones."""
        suite_defaults = self.datasets.get(suite, {}).get("checkpoints") if suite else None
        names = list(requested or suite_defaults or [self.default])
        for name in names:
            self.get(name)
        return names

    def threshold(self, spec: CheckpointSpec, suite: str, case: str,
                  library_default: Threshold | None = None) -> Threshold:
        """The threshold of `case` (a task id) in `suite`: the entry's own table first, then the file's; a task's key
        before `default`. A robustness variant (libero_goal_lan) falls back to its record's threshold_fallback tables
        ([thresholds.libero_pro]), so one default covers every family while any one variant can still set its own."""
        from .suites import SUITES

        fallback = getattr(SUITES.get(suite), "threshold_fallback", None)
        names = (suite, fallback) if fallback else (suite,)
        for name in names:
            for table in (spec.thresholds.get(name, {}), self.suite_thresholds.get(name, {})):
                for key in (case, "default"):
                    if key in table:
                        return Threshold.success_rate(table[key])
        if library_default is not None:
            return library_default
        raise VlaBenchError(f"{self.path}: no threshold for {suite} {case}: add [thresholds.{names[-1]}] default = ... "
                            f"or [checkpoints.{spec.name}.thresholds.{suite}]")

    def dataset(self, suite: str) -> dict:
        """The [datasets.SUITE] table (path resolved against this file's folder) of an open-loop suite."""
        if suite not in self.datasets:
            raise VlaBenchError(f"{self.path}: no [datasets.{suite}] table; add one with path = \"...\" "
                                f"(or pass --vla-data {suite}=PATH)")
        table = dict(self.datasets[suite])
        table["path"] = str(resolve_relative(self.path, table["path"]))
        return table

    def identity(self, spec: CheckpointSpec) -> str:
        return family_module(spec.kind).identity(spec, self)

    # ---- write-back ---------------------------------------------------------------------------------------------
    def add_entry(self, name: str, values: Mapping[str, Any], comment: str | None = None,
                  replace: bool = False) -> CheckpointSpec:
        """Add (or replace) [checkpoints.NAME] and save the file; comments and order of the rest are kept."""
        checkpoints = self.document["checkpoints"]
        if name in checkpoints and not replace:
            raise VlaBenchError(f"{self.path}: entry [checkpoints.{name}] exists already; choose another name")
        table = tomlkit.table()
        if comment:
            table.comment(comment)
        for k, v in values.items():
            table[k] = v
        checkpoints[name] = table
        spec = self._spec(name, table.unwrap())
        # a temp file renamed over the original: a kill never leaves the user's checkpoints.toml half written
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(tomlkit.dumps(self.document))
        os.replace(partial, self.path)
        self.checkpoints[name] = spec
        return spec


def resolve_relative(toml_path: Path, value: str) -> Path:
    """Paths in checkpoints.toml are relative to the file's folder, so the file works from any directory."""
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else (toml_path.parent / p).resolve()


def default_path(start: Path | None = None) -> Path:
    """$VLA_BENCH_CHECKPOINTS, else the nearest checkpoints.toml in the working directory or its parents (so
    `pytest suites/libero_spatial` and `cd suites && pytest` find the same file)."""
    env = os.environ.get("VLA_BENCH_CHECKPOINTS")
    if env:
        return Path(env)
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "checkpoints.toml").is_file():
            return folder / "checkpoints.toml"
    raise VlaBenchError(f"no checkpoints.toml in {start} or its parents; pass --checkpoints-file PATH "
                        "or set VLA_BENCH_CHECKPOINTS")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_threshold_tables(tables: Any, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(tables, dict):
        raise VlaBenchError(f"{where}: must be a table of suites")
    for suite, table in tables.items():
        if not isinstance(table, dict):
            raise VlaBenchError(f"{where}.{suite}: must be a table like {{default = 0.9, task5 = 0.8}}")
        for case, value in table.items():
            ok = _is_number(value) or (isinstance(value, list) and len(value) == 2
                                       and all(_is_number(v) for v in value))
            if not ok:
                raise VlaBenchError(f"{where}.{suite} {case}: a threshold is a number or a [low, high] pair, "
                                    f"got {value!r}")
            # every gated figure (a success rate, an accuracy, a fraction, a correlation) is at most 1: a threshold
            # of 1.5 would fail a checkpoint that succeeds every time, so it is a typo for 0.15 or 15%
            bounds = value if isinstance(value, list) else [value]
            if not all(0.0 <= v <= 1.0 for v in bounds):
                raise VlaBenchError(f"{where}.{suite} {case}: threshold {value!r} is outside [0, 1]; thresholds are "
                                    "fractions (0.9 means 90%)")
            if isinstance(value, list) and value[0] > value[1]:
                raise VlaBenchError(f"{where}.{suite} {case}: [low, high] = {value!r} has low above high; "
                                    f"write [{value[1]}, {value[0]}]")
    return tables
