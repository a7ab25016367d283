"""A cache of heavy objects (models, tokenizers) shared by every checkpoint of a session.

Keys are chosen by the family (for OpenVLA: weights identity, dtype, device), so several checkpoints that share
base weights (LoRA adapters) share one model in memory. The pytest plugin keeps one cache per session; the CLI
keeps one per command.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable


class ModelCache:
    def __init__(self) -> None:
        self._items: dict[Hashable, Any] = {}
        self.loads = 0  # how many times a factory ran: tests check that shared bases load once

    def get_or_create(self, key: Hashable, factory: Callable[[], Any]) -> Any:
        if key not in self._items:
            self._items[key] = factory()
            self.loads += 1
        return self._items[key]

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def clear(self) -> None:
        self._items.clear()
