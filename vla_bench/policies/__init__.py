"""Policies: the Policy protocol (base.py), the checkpoint kinds (kinds.py) and building one from a registry entry."""
from __future__ import annotations

import dataclasses
import typing

from .base import Policy
from .cache import ModelCache
from .capabilities import Capabilities, capabilities_of, check_policy
from .kinds import family_module

if typing.TYPE_CHECKING:
    from ..registry import CheckpointSpec, Registry


@dataclasses.dataclass
class BuildContext:
    registry: "Registry"
    suite: str  # e.g. "libero_spatial" or "bridge_v2": families pick their pre/post-processing from it
    cache: ModelCache
    #: build the model on this device instead of the entry's own (--vla-devices: one replica per device); kinds
    #: without a model ignore it
    device: str | None = None


def build_policy(spec: "CheckpointSpec", context: BuildContext) -> Policy:
    policy = family_module(spec.kind).build(spec, context)
    if not isinstance(policy, Policy):
        raise TypeError(f"kind {spec.kind!r} built {type(policy).__name__}, which is not a Policy")
    check_policy(policy, spec.where())  # a wrong record is named now, not mid-run
    return policy


__all__ = ["BuildContext", "Capabilities", "ModelCache", "Policy", "build_policy", "capabilities_of", "check_policy"]
