"""The one Threshold type: what a measured figure must meet for its test to pass.

Closed-loop success rates come from checkpoints.toml as a number (the rate must be >= it) or a [low, high] pair
(it must lie inside); open-loop proxy metrics have library defaults (vla_bench/open_loop.py) that an entry may
override, some strict (> minimum) and some with a ceiling that warns rather than fails.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any


@dataclasses.dataclass(frozen=True)
class Threshold:
    minimum: float | None = None
    maximum: float | None = None  # inclusive upper bound of a [low, high] range
    inclusive: bool = True  # the minimum itself passes (>=) or not (>)
    warn_above: float | None = None  # above this the figure passes but is suspicious (e.g. train-split leakage)
    percent: bool = False  # shown as a percentage (success rates)

    @classmethod
    def success_rate(cls, value: Any) -> "Threshold":
        """A checkpoints.toml threshold (validated by the registry): a number or a [low, high] pair."""
        if isinstance(value, (list, tuple)):
            return cls(minimum=float(value[0]), maximum=float(value[1]), percent=True)
        return cls(minimum=float(value), percent=True)

    @property
    def is_minimum(self) -> bool:
        """A plain lower bound (no range): the only kind whose verdict curtailment can fix early."""
        return self.minimum is not None and self.maximum is None

    def passes(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.minimum is not None and not (value >= self.minimum if self.inclusive else value > self.minimum):
            return False
        return self.maximum is None or value <= self.maximum

    def warning(self, value: float) -> str | None:
        if self.warn_above is not None and math.isfinite(value) and value > self.warn_above:
            return f"{value:.3f} is above {self.warn_above:.2f}, the top of the expected range"
        return None

    def _number(self, x: float) -> str:
        return f"{x:.0%}" if self.percent else f"{x:.2f}"

    def describe(self) -> str:
        if self.maximum is not None:
            return f"[{self._number(self.minimum)}, {self._number(self.maximum)}]"
        text = f"{'>=' if self.inclusive else '>'} {self._number(self.minimum)}"
        return text + (f" (expected <= {self._number(self.warn_above)})" if self.warn_above is not None else "")

    def as_plain(self) -> float | tuple[float, float]:
        """The number or (low, high) pair as checkpoints.toml spells it (the JUnit `threshold` property)."""
        return (self.minimum, self.maximum) if self.maximum is not None else self.minimum


def describe(threshold: Threshold | None) -> str:
    """A threshold for a table cell: '-' when there is none."""
    return "-" if threshold is None else threshold.describe()
