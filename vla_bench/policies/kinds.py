"""Checkpoint kinds: the `kind` key of a checkpoints.toml entry -> the module that implements that family.

Each family module is imported only when an entry of its kind is used, so that validating checkpoints.toml or
running the scripted expert never imports torch. A family module provides:

    KEYS: dict[str, type | tuple[type, ...]]   # the entry keys it accepts, besides the common ones below
    REQUIRED: tuple[str, ...]                  # keys that must be present
    def validate(spec, registry) -> None        # optional: cross-checks; raise VlaBenchError naming file/entry/key
    def identity(spec, registry) -> str         # content identity recorded with every result (hash of files...)
    def build(spec, context) -> Policy          # the policy, using context.cache for anything heavy

A user's own family plugs in through the `vla_bench_checkpoint_kinds` plugin hook (see vla_bench/hookspec.py),
which returns more {kind: module} pairs, rather than through edits to this table.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import VlaBenchError, choices

BUILTIN_KINDS = {
    "scripted": "vla_bench.policies.scripted",
    "noop": "vla_bench.policies.controls",
    "random": "vla_bench.policies.controls",
    "replay": "vla_bench.policies.replay",
    "openvla": "vla_bench.openvla.kind",
    "remote": "vla_bench.policies.remote",
}

#: keys every entry may have, whatever its kind
COMMON_KEYS = {"kind": str, "description": str, "baseline": str, "thresholds": dict}

_extra_kinds: dict[str, str] = {}


def register_kinds(mapping: dict[str, str]) -> None:
    """Add {kind: module path} pairs (used by the plugin hook for users' own families)."""
    _extra_kinds.update(mapping)


def all_kinds() -> dict[str, str]:
    return {**BUILTIN_KINDS, **_extra_kinds}


def family_module(kind: str, where: str = "") -> ModuleType:
    kinds = all_kinds()
    if kind not in kinds:
        raise VlaBenchError(f"{where}unknown kind {kind!r}; valid kinds: {choices(sorted(kinds))}")
    return importlib.import_module(kinds[kind])
