"""Summaries of repeated measurements: medians, percentiles and spreads. Pure."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks
    (numpy's default), so p50 of an even count is the mean of the middle two."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is outside 0..100")
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = math.ceil(position)
    if low == high:
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Series:
    """Repeated measurements of one quantity (one value per repetition, per task or per
    agent, as the row says). The table shows the median and the min–max spread."""

    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError("a series needs at least one value")

    @classmethod
    def of(cls, values: Iterable[float]) -> Series:
        return cls(tuple(float(v) for v in values))

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def percentile(self, q: float) -> float:
        return percentile(self.values, q)

    def scaled(self, factor: float) -> Series:
        """The same measurements in another unit (or per item): each value times factor."""
        return Series(tuple(v * factor for v in self.values))

    def __len__(self) -> int:
        return len(self.values)
